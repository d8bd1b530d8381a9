"""The ``celery worker`` subprocess of a run, and the control calls that point it at a queue."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench.benchapp.apps import READY_FILE_ENV

ROOT = Path(__file__).resolve().parent.parent


class BenchWorker:
    """A prefork worker that starts on an idle queue and is pointed at one queue per run.

    One worker serves every variant, so both sides of a comparison run on the same processes;
    ``add_consumer`` / ``cancel_consumer`` switch it between queues without a restart.
    """

    def __init__(
        self,
        app: Any,
        prefix: str,
        *,
        name: str = "worker",
        env: dict[str, str] | None = None,
        concurrency: int = 2,
    ) -> None:
        self.app = app
        self.hostname = f"{prefix}-{name}@bench"
        self.idle_queue = f"{prefix}-idle-{name}"
        self.env = env or {}
        self.concurrency = concurrency
        self.process: subprocess.Popen[bytes] | None = None
        tag = uuid.uuid4().hex[:8]
        self.ready_file = Path(tempfile.gettempdir()) / f"cgb-ready-{tag}"
        self.log_path = Path(tempfile.gettempdir()) / f"cgb-worker-{tag}.log"

    def start(self, timeout: float = 120) -> None:
        """Start the worker and wait until it consumes its idle queue."""
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "example_project")]),
            READY_FILE_ENV: str(self.ready_file),
            **self.env,
        }
        cmd = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "proj",
            "worker",
            "-Q",
            self.idle_queue,
            "-n",
            self.hostname,
            "-c",
            str(self.concurrency),
            "-P",
            "prefork",
            "-l",
            "WARNING",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ]
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                cmd,
                env=env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while not self.ready_file.exists():
            if self.process.poll() is not None:
                raise RuntimeError(f"the bench worker exited early:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the bench worker was not ready in {timeout}s")
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        """Pid of the worker's main process (the leader of its own process group)."""
        assert self.process is not None
        return self.process.pid

    def _control(self, command: str, queue: str) -> None:
        method = getattr(self.app.control, command)
        replies = method(queue, destination=[self.hostname], reply=True, timeout=10) or []
        if not any(self.hostname in r and "ok" in r[self.hostname] for r in replies):
            raise RuntimeError(f"{command}({queue!r}) got no ok from the worker: {replies!r}")

    def consume(self, queue: str) -> None:
        """Start consuming ``queue`` (returns once the worker confirmed)."""
        self._control("add_consumer", queue)

    def stop_consuming(self, queue: str) -> None:
        """Stop consuming ``queue``."""
        self._control("cancel_consumer", queue)

    def stop(self, timeout: float = 20) -> None:
        """Warm shutdown of the worker's process group; SIGKILL it if that takes too long."""
        self.ready_file.unlink(missing_ok=True)
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        if self.process is not None and self.process.returncode not in (0, None):
            print(
                f"the bench worker exited with {self.process.returncode}:\n{self.log_tail()}",
                file=sys.stderr,
            )
        self.log_path.unlink(missing_ok=True)

    def log_tail(self, lines: int = 40) -> str:
        """Return the end of the worker's log."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"
