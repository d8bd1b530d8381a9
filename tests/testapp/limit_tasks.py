"""Tasks with limits (docs/limits.md); each records its execution."""

import os
from typing import Any

import redis

from celery_guard import guarded_task
from celery_guard.observability import events
from tests.testapp.tasks import record

#: Fairness test: the Redis key counting the deferrals of each tenant (a hash), when set.
DEFERRAL_COUNTER = os.environ.get("CG_DEFERRAL_COUNTER", "")

__all__ = [
    "deadline_job",
    "fair_job",
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
def pausable_job(self, label: str, sleep_ms: int = 0) -> None:
    record(self, label, sleep_ms)


@guarded_task(priority="high", bind=True, deadline=3)
def deadline_job(self, label: str) -> None:
    record(self, label)


@guarded_task(
    priority="high",
    bind=True,
    tenant="dept-{department_id}",
    tenant_rate="20/s",
)
def fair_job(self, department_id: int, label: str) -> None:
    """The fairness test's job: records, with its start, the deferrals counted so far."""
    if DEFERRAL_COUNTER:
        label += f"@{int(_counter().hget(DEFERRAL_COUNTER, 'dept-1') or 0)}"
    record(self, label)


_clients: dict[int, Any] = {}


def _counter() -> Any:
    client = _clients.get(os.getpid())
    if client is None:
        client = _clients[os.getpid()] = redis.Redis.from_url(os.environ["REDIS_URL"])
    return client


def _count_deferral(event: Any, fields: dict[str, Any]) -> None:
    if event.name == "throttled" and fields.get("tenant"):
        _counter().hincrby(DEFERRAL_COUNTER, str(fields["tenant"]))


if DEFERRAL_COUNTER:
    events.subscribe(_count_deferral, uid="test-fairness-deferrals")
