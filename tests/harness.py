"""Real-service test harness: Celery worker processes, broker queue lengths, waiting."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import redis
from kombu import Connection

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"


def wait_until(predicate: Callable[[], Any], timeout: float = 30, interval: float = 0.1) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {predicate}")
        time.sleep(interval)


def celery_command(*args: str) -> list[str]:
    """The ``celery`` command line of the test project with ``args``."""
    return [sys.executable, "-m", "celery", "-A", "proj", *args]


class Worker:
    """A ``celery worker`` subprocess of the test project, started and stopped by a test.

    It runs with the suite's settings and test database, consumes ``queues`` from
    ``broker_url`` and is ready once it has written its ready file (``worker_ready``).
    """

    #: Prefix of the log file name.
    kind = "worker"

    def __init__(
        self,
        queues: Iterable[str],
        *,
        broker_url: str,
        db_name: str,
        name: str | None = None,
        concurrency: int = 1,
        pool: str = "prefork",
        extra_env: dict[str, str] | None = None,
        extra_args: Iterable[str] = (),
    ) -> None:
        self.queues = list(queues)
        self.extra_args = list(extra_args)
        self.name = name or f"w{uuid.uuid4().hex[:6]}"
        self.broker_url = broker_url
        self.db_name = db_name
        self.concurrency = concurrency
        self.pool = pool
        self.extra_env = extra_env or {}
        self.process: subprocess.Popen[bytes] | None = None
        ARTIFACTS.mkdir(exist_ok=True)
        self.log_path = ARTIFACTS / f"{self.kind}-{self.name}.log"
        self.ready_file = Path(tempfile.gettempdir()) / f"cg-ready-{self.name}-{uuid.uuid4().hex}"

    def start(self, timeout: float = 90) -> Worker:
        """Start the worker and wait until it consumes."""
        self.launch()
        return self.wait_ready(timeout)

    def launch(self) -> None:
        """Start the process without waiting for it to be ready."""
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "tests.settings",
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "example_project")]),
            "CELERY_BROKER_URL": self.broker_url,
            "CG_WORKER_DB_NAME": self.db_name,
            "CG_READY_FILE": str(self.ready_file),
            **self.extra_env,
        }
        cmd = self.command()
        log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def wait_ready(self, timeout: float = 90) -> Worker:
        """Wait until the process has written its ready file."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while not self.ready_file.exists():
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.kind} {self.name} exited early:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"{self.kind} {self.name} not ready in {timeout}s:\n{self.log_tail()}"
                )
            time.sleep(0.05)
        return self

    def command(self) -> list[str]:
        """The command line of the process."""
        return celery_command(
            "worker",
            "-Q",
            ",".join(self.queues),
            "-n",
            f"{self.name}@%h",
            "-c",
            str(self.concurrency),
            "-P",
            self.pool,
            "-l",
            "INFO",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            *self.extra_args,
        )

    @property
    def pid(self) -> int:
        """Pid of the worker's main process."""
        assert self.process is not None
        return self.process.pid

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the worker's whole process group (main process and pool children)."""
        assert self.process is not None
        os.killpg(self.process.pid, sig)

    def stop(self, timeout: float = 20) -> None:
        """Warm shutdown; SIGKILL the group if it does not stop in time."""
        if self.process is None or self.process.poll() is not None:
            self.ready_file.unlink(missing_ok=True)
            return
        self.signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.process.wait(10)
        self.ready_file.unlink(missing_ok=True)

    def log_tail(self, lines: int = 60) -> str:
        """Return the end of the worker's log, for failure messages."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


def queue_length(broker_url: str, queue: str) -> int:
    """Count the messages waiting in ``queue`` on the real broker."""
    if broker_url.startswith(("redis://", "rediss://")):
        client = redis.Redis.from_url(broker_url)
        # Celery's Redis transport spreads priorities over several lists per queue.
        names = [queue, *(f"{queue}\x06\x16{step}" for step in range(1, 10))]
        return int(sum(client.llen(name) for name in names))
    with Connection(broker_url) as conn:
        channel = conn.channel()
        try:
            return int(channel.queue_declare(queue=queue, passive=True).message_count)
        except Exception as exc:  # the queue does not exist: nothing was ever published to it
            if "NOT_FOUND" in str(exc) or "404" in str(exc):
                return 0
            raise
        finally:
            with contextlib.suppress(Exception):
                channel.close()


def purge(broker_url: str, queues: Iterable[str]) -> None:
    """Empty ``queues`` on the broker (queues that do not exist are skipped)."""
    with Connection(broker_url) as conn:
        for queue in queues:
            channel = conn.channel()
            # A queue that was never declared has nothing to purge.
            with contextlib.suppress(Exception):
                channel.queue_purge(queue)
            with contextlib.suppress(Exception):
                channel.close()
