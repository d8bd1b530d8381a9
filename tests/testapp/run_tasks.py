"""Tasks of the bulk-run tests (``run_`` prefix); imported by tests.testapp.tasks."""

import os
import signal
import time
from pathlib import Path

from celery_guard import PermanentError, TransientError, guarded_task, runs
from tests.testapp.models import Execution


@guarded_task(bind=True, priority="high", max_attempts=4, backoff=0.2)
def run_item(self, n: int, fail: str = "", fixed: str = "", sleep_ms: int = 0) -> None:
    """One item: its effect written with ``self.guard.atomic()``, or an injected failure.

    ``fail``: ``"permanent"`` (until the file ``fixed`` exists) or ``"transient"`` (the
    first attempt only).
    """
    if sleep_ms:
        time.sleep(sleep_ms / 1000)
    if fail == "permanent" and not (fixed and Path(fixed).exists()):
        raise PermanentError(f"employee {n} has no gateway address")
    if fail == "transient" and self.request.retries == 0:
        raise TransientError(f"gateway timeout for employee {n}")
    _effect(self, f"run-item:{n}")


@guarded_task(bind=True, priority="high")
def run_barrier(self, n: int, barrier: str, peers: int) -> None:
    """Wait until ``peers`` items are running at once, then finish together."""
    folder = Path(barrier)
    (folder / f"started-{n}").touch()
    deadline = time.monotonic() + 60
    while len(list(folder.glob("started-*"))) < peers:
        if time.monotonic() > deadline:
            raise PermanentError("the other items never ran at the same time")
        time.sleep(0.005)


@guarded_task(bind=True, priority="high")
def run_complete(self, label: str) -> None:
    """The completion: records the run's summary it was given."""
    Execution.objects.create(
        task=self.name,
        label=f"complete:{label}",
        queue="",
        hostname=self.request.hostname or "",
        guard_header=runs.summary(self),
        started_at=time.time(),
        finished_at=time.time(),
    )


@guarded_task(bind=True, priority="high")
def run_kill_once(self, n: int, marker: str) -> None:
    """Item 0 SIGKILLs its whole worker the first time it runs; then every item succeeds."""
    path = Path(marker)
    if n == 0 and not path.exists():
        path.write_text(str(os.getpid()))
        os.killpg(os.getpgid(0), signal.SIGKILL)
    _effect(self, f"kill-item:{n}")


def _effect(task, label: str) -> None:
    """The item's one effect, committed with its key (``self.guard.atomic()``)."""
    with task.guard.atomic():
        Execution.objects.create(
            task=task.name,
            label=label,
            queue="",
            hostname=task.request.hostname or "",
            started_at=time.time(),
            finished_at=time.time(),
        )
