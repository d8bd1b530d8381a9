"""Tasks of the idempotency tests (issue 3); imported by tests.testapp.tasks."""

import os
import signal
from datetime import timedelta
from pathlib import Path

from celery_guard import guarded_task
from celery_guard.task import GuardedTask


def _record(task, label: str) -> None:
    from tests.testapp.tasks import record

    record(task, label)


def _kill_own_worker(marker: str) -> None:
    """SIGKILL this worker's whole process group, once (the marker file says it happened)."""
    path = Path(marker)
    if path.exists():
        return
    path.write_text(str(os.getpid()))
    os.killpg(os.getpgid(0), signal.SIGKILL)


@guarded_task(
    priority="high",
    bind=True,
    idempotency_key="notify:{employee_id}:{event_version}",
    dedup_window=timedelta(hours=6),
)
def idem_notify(self, employee_id: int, event_version: str, note: str = "") -> None:
    _record(self, f"notify:{employee_id}:{event_version}:{note}:{self.guard.fencing_token}")


@guarded_task(priority="low", idempotency_key="race:{n}", dedup_window=7200)
def idem_race(n: int) -> None:
    """Published by the race test; never consumed."""


@guarded_task(priority="high", bind=True, idempotency_key="retry:{label}", max_retries=3)
def idem_retry(self, label: str) -> None:
    _record(self, f"{label}:{self.request.retries}:{self.guard.fencing_token}")
    if self.request.retries == 0:
        raise self.retry(countdown=0.1)


@guarded_task(priority="high", bind=True, idempotency_key="atomic:{label}")
def idem_atomic(self, label: str, fail: bool = False) -> None:
    with self.guard.atomic():
        _record(self, label)
        if fail:
            raise RuntimeError("the effect must roll back with the ledger")


@guarded_task(priority="high", bind=True, idempotency_key="fail:{label}")
def idem_fail(self, label: str) -> None:
    _record(self, label)
    raise RuntimeError("fails on purpose")


class KillAfterReturn(GuardedTask):
    """Kills its worker after the body returned (key marked succeeded), before the ack."""

    def after_return(self, status, retval, task_id, args, kwargs, einfo):
        if kwargs.get("when") == "after_return":
            _kill_own_worker(kwargs["marker"])


@guarded_task(priority="high", bind=True, base=KillAfterReturn, idempotency_key="crash:{label}")
def idem_crash(self, label: str, marker: str, when: str) -> None:
    """The side effect, then a SIGKILL of the worker before the message is acked.

    ``when``: ``"after_return"`` (the key is marked succeeded first), ``"atomic"`` (the
    effect and the ledger committed together) or ``"before_completion"`` (the worker dies
    holding the lease).
    """
    if when == "atomic":
        with self.guard.atomic():
            _record(self, f"{label}:{self.guard.fencing_token}")
    else:
        _record(self, f"{label}:{self.guard.fencing_token}")
    if when in ("atomic", "before_completion"):
        _kill_own_worker(marker)


@guarded_task(priority="high", bind=True, idempotency_key="give_up:{label}")
def idem_give_up(self, label: str) -> None:
    _record(self, label)
    raise ValueError("fails for good")


@guarded_task(priority="high", bind=True, idempotency_key="poison:{label}")
def idem_kill_self(self, label: str) -> None:
    """Kills its own pool process on every run, holding its key's lease."""
    _record(self, f"{label}:{self.guard.fencing_token}")
    os.kill(os.getpid(), signal.SIGKILL)


@guarded_task(priority="high", bind=True, idempotency_key="done:{label}")
def idem_commit_then_die(self, label: str) -> None:
    """Commits its effect with the key, then its pool process dies before the ack."""
    with self.guard.atomic():
        _record(self, f"{label}:{self.guard.fencing_token}")
    os.kill(os.getpid(), signal.SIGKILL)
