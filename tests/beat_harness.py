"""Real ``celery beat`` processes running the guarded scheduler, for the beat tests."""

from __future__ import annotations

import uuid

from tests.harness import Worker, celery_command

SCHEDULER = "celery_guard.beat:GuardedScheduler"


class Beat(Worker):
    """A ``celery beat -S celery_guard.beat:GuardedScheduler`` subprocess.

    Same life cycle as :class:`~tests.harness.Worker` (ready file written on ``beat_init``,
    own process group, SIGTERM then SIGKILL on stop). Its database connections carry the
    ``application_name`` ``cg-beat-<name>`` on PostgreSQL, so a test can terminate them.
    """

    kind = "beat"

    def __init__(
        self,
        *,
        broker_url: str,
        db_name: str,
        lease_seconds: float,
        max_interval: int = 1,
        name: str | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        name = name or f"b{uuid.uuid4().hex[:6]}"
        env = {
            "CG_BEAT_LEASE_SECONDS": str(lease_seconds),
            "CG_DB_APPLICATION_NAME": f"cg-beat-{name}",
            **(extra_env or {}),
        }
        super().__init__([], broker_url=broker_url, db_name=db_name, name=name, extra_env=env)
        self.max_interval = max_interval

    def command(self) -> list[str]:
        """``celery beat`` with the guarded scheduler and a short loop interval."""
        return celery_command(
            "beat", "-S", SCHEDULER, "--max-interval", str(self.max_interval), "-l", "INFO"
        )
