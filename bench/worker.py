"""The ``celery worker`` subprocess of a run, and the control calls that point it at a queue."""

from __future__ import annotations

import sys
from typing import Any

from devprocs.launcher import CeleryProcess


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
        self.process = CeleryProcess.worker(
            "proj",
            [self.idle_queue],
            name=f"{prefix}-{name}",
            hostname=self.hostname,
            concurrency=concurrency,
            loglevel="WARNING",
            env=env,
        )

    def start(self, timeout: float = 120) -> None:
        """Start the worker and wait until it consumes its idle queue."""
        self.process.start(timeout)

    @property
    def pid(self) -> int:
        """Pid of the worker's main process (the leader of its own process group)."""
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
        self.process.stop(timeout)
        if self.process.returncode not in (0, None):
            print(
                f"the bench worker exited with {self.process.returncode}:\n"
                f"{self.process.log_tail(40)}",
                file=sys.stderr,
            )
        self.process.log_path.unlink(missing_ok=True)
