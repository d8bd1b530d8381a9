"""Tasks with limits (docs/limits.md); each records its execution."""

from celery_guard import guarded_task
from tests.testapp.tasks import record

__all__ = [
    "deadline_job",
    "gateway_job",
    "keyed_limited_job",
    "limited_job",
    "pausable_job",
    "rated_job",
    "tenant_job",
]


@guarded_task(priority="high", bind=True, concurrency=1)
def limited_job(self, label: str, sleep_ms: int = 0) -> None:
    record(self, label, sleep_ms)


@guarded_task(priority="high", bind=True, concurrency=1, idempotency_key="limited:{label}")
def keyed_limited_job(self, label: str, sleep_ms: int = 0) -> None:
    record(self, label, sleep_ms)


@guarded_task(priority="high", bind=True, rate="4/s")
def rated_job(self, label: str) -> None:
    record(self, label)


@guarded_task(priority="high", bind=True, limits=["test-gateway"])
def gateway_job(self, label: str, sleep_ms: int = 0) -> None:
    record(self, label, sleep_ms)


@guarded_task(priority="high", bind=True, tenant="dept-{department_id}", tenant_concurrency=1)
def tenant_job(self, department_id: int, label: str, sleep_ms: int = 0) -> None:
    record(self, label, sleep_ms)


@guarded_task(priority="high", bind=True)
def pausable_job(self, label: str) -> None:
    record(self, label)


@guarded_task(priority="high", bind=True, deadline=3)
def deadline_job(self, label: str) -> None:
    record(self, label)
