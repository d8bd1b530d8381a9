"""Tasks of the dead-letter queue tests (``dlq_`` prefix); each records its executions."""

from celery_guard import PermanentError, guarded_task
from tests.testapp.models import Execution
from tests.testapp.tasks import record


def fix(label: str) -> None:
    """Make :func:`dlq_until_fixed` succeed for ``label`` from now on (the "fix the cause")."""
    Execution.objects.create(
        task="fix", label=f"dlqfix:{label}", queue="", hostname="", started_at=0, finished_at=0
    )


@guarded_task(bind=True)
def dlq_until_fixed(self, label: str, note: str = "") -> None:
    """Dead-letters (permanent error) until :func:`fix` was called for ``label``."""
    if not Execution.objects.filter(label=f"dlqfix:{label}").exists():
        raise PermanentError(f"{label} is not fixed yet")
    record(self, label)


@guarded_task
def dlq_plain(label: str, count: int = 1) -> None:
    """An unbound guarded task (its signature has no ``self``)."""


@guarded_task(max_attempts=2, backoff=0)
def dlq_leaky(card_number: str, api_key: str = "", note: str = "") -> None:
    """Fails quoting its secret arguments: a transient error, then exhausted."""
    raise ConnectionError(f"card {card_number} refused for key {api_key!r} ({note})")
