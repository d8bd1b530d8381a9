"""Start, watch and stop the ``celery worker`` / ``beat`` processes of the tests, demo and bench.

:class:`CeleryProcess` runs ``python -m devprocs.launcher -A APP ...``: this module is also the
child's entry point. It connects Celery's ``worker_ready`` / ``beat_init`` signals to write a
ready file and then hands over to Celery's own ``celery`` command, so a process counts as ready
when it consumes (or schedules), whatever app it runs and without that app's cooperation.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

#: The environment variable naming the file the child writes once it is ready.
READY_FILE_ENV = "CG_READY_FILE"
#: The repository root: the working directory of every child.
ROOT = Path(__file__).resolve().parents[2]
#: What a child needs on ``sys.path``: the repository (``tests``, ``bench``) and the example
#: project (``proj``, ``demo``, this package).
SEARCH_PATH = (ROOT, ROOT / "example_project")


def worker_args(
    queues: Sequence[str],
    *,
    hostname: str,
    concurrency: int = 1,
    pool: str = "prefork",
    loglevel: str = "INFO",
) -> list[str]:
    """``worker`` arguments: consume ``queues``; no gossip, mingle or heartbeat (less chatter)."""
    return [
        "worker",
        "-Q",
        ",".join(queues),
        "-n",
        hostname,
        "-c",
        str(concurrency),
        "-P",
        pool,
        "-l",
        loglevel,
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]


def beat_args(scheduler: str, *, max_interval: float = 1, loglevel: str = "INFO") -> list[str]:
    """``beat`` arguments: run ``scheduler``, waking at least every ``max_interval`` seconds."""
    return ["beat", "-S", scheduler, "--max-interval", str(max_interval), "-l", loglevel]


class CeleryProcess:
    """One ``celery -A APP ARGS`` subprocess in a process group of its own.

    Args:
        app: The ``-A`` argument (a module with a Celery app).
        args: The rest of the command line (``worker ...``, ``beat ...``).
        name: A short name, for log file names and messages.
        env: Variables added to this process's environment for the child.
        log_path: Where the child's stdout and stderr go (kept after it stops); a file in the
            temporary directory by default.
    """

    def __init__(
        self,
        app: str,
        args: Sequence[str],
        *,
        name: str,
        env: Mapping[str, str] | None = None,
        log_path: Path | None = None,
    ) -> None:
        self.app = app
        self.args = list(args)
        self.name = name
        self.env = dict(env or {})
        tag = uuid.uuid4().hex[:8]
        tmp = Path(tempfile.gettempdir())
        self.log_path = log_path or tmp / f"cg-{name}-{tag}.log"
        self.ready_file = tmp / f"cg-ready-{name}-{tag}"
        self.process: subprocess.Popen[bytes] | None = None

    @classmethod
    def worker(
        cls,
        app: str,
        queues: Sequence[str],
        *,
        name: str,
        hostname: str | None = None,
        concurrency: int = 1,
        pool: str = "prefork",
        loglevel: str = "INFO",
        env: Mapping[str, str] | None = None,
        log_path: Path | None = None,
    ) -> CeleryProcess:
        """A ``celery worker`` consuming ``queues`` (see :func:`worker_args`)."""
        args = worker_args(
            queues,
            hostname=hostname or f"{name}@%h",
            concurrency=concurrency,
            pool=pool,
            loglevel=loglevel,
        )
        return cls(app, args, name=name, env=env, log_path=log_path)

    @classmethod
    def beat(
        cls,
        app: str,
        *,
        name: str,
        scheduler: str,
        max_interval: float = 1,
        loglevel: str = "INFO",
        env: Mapping[str, str] | None = None,
        log_path: Path | None = None,
    ) -> CeleryProcess:
        """A ``celery beat`` running ``scheduler`` (see :func:`beat_args`)."""
        args = beat_args(scheduler, max_interval=max_interval, loglevel=loglevel)
        return cls(app, args, name=name, env=env, log_path=log_path)

    def command(self) -> list[str]:
        """The child's command line."""
        return [sys.executable, "-m", "devprocs.launcher", "-A", self.app, *self.args]

    def launch(self) -> None:
        """Start the process without waiting for it to be ready."""
        inherited = os.environ.get("PYTHONPATH")
        path = [*map(str, SEARCH_PATH), *([inherited] if inherited else [])]
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(path),
            READY_FILE_ENV: str(self.ready_file),
            **self.env,
        }
        self.ready_file.unlink(missing_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self.command(),
                env=env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_ready(self, timeout: float = 90) -> CeleryProcess:
        """Wait until the child wrote its ready file; stop it and raise if it does not."""
        assert self.process is not None, "launch() first"
        deadline = time.monotonic() + timeout
        while not self.ready_file.exists():
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited early:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} not ready in {timeout}s:\n{self.log_tail()}")
            time.sleep(0.05)
        return self

    def start(self, timeout: float = 90) -> CeleryProcess:
        """Launch the process and wait until it is ready."""
        self.launch()
        return self.wait_ready(timeout)

    @property
    def pid(self) -> int:
        """Pid of the main process (the leader of its process group)."""
        assert self.process is not None, "launch() first"
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        """The exit status, or None while it runs (or before it started)."""
        return None if self.process is None else self.process.poll()

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the whole process group (the main process and its pool children)."""
        assert self.process is not None, "launch() first"
        os.killpg(self.process.pid, sig)

    def kill(self) -> None:
        """SIGKILL the process group, as a crash would, and reap the main process."""
        if self.process is not None and self.process.poll() is None:
            self.signal(signal.SIGKILL)
            self.process.wait(10)
        self.ready_file.unlink(missing_ok=True)

    def stop(self, timeout: float = 20) -> None:
        """Warm shutdown (SIGTERM); SIGKILL the group if it does not stop within ``timeout``."""
        if self.process is not None and self.process.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.process.wait(10)
        self.ready_file.unlink(missing_ok=True)

    def log_tail(self, lines: int = 60) -> str:
        """The end of the child's log, for failure messages."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


def _touch_ready_file(sender: Any = None, **kwargs: Any) -> None:
    Path(os.environ[READY_FILE_ENV]).write_text(str(os.getpid()))


def main() -> None:
    """The child: connect the ready handshake, then run Celery's ``celery`` command."""
    from celery import signals
    from celery.__main__ import main as celery_main

    if os.environ.get(READY_FILE_ENV):
        signals.worker_ready.connect(_touch_ready_file, dispatch_uid="devprocs.ready", weak=False)
        signals.beat_init.connect(_touch_ready_file, dispatch_uid="devprocs.beat", weak=False)
    sys.argv[0] = "celery"
    celery_main()


if __name__ == "__main__":
    main()
