"""Real ``celery beat`` processes running the guarded scheduler, for the beat tests."""

from __future__ import annotations

import uuid

from devprocs.launcher import CeleryProcess, beat_args
from tests.support.harness import APP, ARTIFACTS, suite_env

SCHEDULER = "celery_guard.beat:GuardedScheduler"
#: A guarded scheduler that SIGKILLs itself between a slot's claim and its publish.
KILLED_AFTER_CLAIM = "tests.support.beat_killed:KilledAfterClaim"


class Beat(CeleryProcess):
    """A ``celery beat -S celery_guard.beat:GuardedScheduler`` subprocess.

    Same life cycle as a :class:`~tests.support.harness.Worker` (ready on ``beat_init``, own
    process group, SIGTERM then SIGKILL on stop). Its database connections carry the
    ``application_name`` ``cg-beat-<name>`` on PostgreSQL, so a test can terminate them.
    """

    def __init__(
        self,
        *,
        broker_url: str,
        db_name: str,
        lease_seconds: float,
        max_interval: int = 1,
        name: str | None = None,
        extra_env: dict[str, str] | None = None,
        scheduler: str = SCHEDULER,
    ) -> None:
        name = name or f"b{uuid.uuid4().hex[:6]}"
        env = {
            "CG_BEAT_LEASE_SECONDS": str(lease_seconds),
            "CG_DB_APPLICATION_NAME": f"cg-beat-{name}",
            **(extra_env or {}),
        }
        super().__init__(
            APP,
            beat_args(scheduler, max_interval=max_interval),
            name=name,
            env=suite_env(broker_url, db_name, env),
            log_path=ARTIFACTS / f"beat-{name}.log",
        )
