"""Every admin of celery_guard, each registered by its feature's own ``admin`` module."""

from celery_guard.beat import admin as beat_admin
from celery_guard.delivery import admin as delivery_admin
from celery_guard.dlq import admin as dlq_admin
from celery_guard.idempotency import admin as idempotency_admin
from celery_guard.limits import admin as limits_admin
from celery_guard.observability import admin as observability_admin
from celery_guard.runs import admin as runs_admin

__all__ = [
    "beat_admin",
    "delivery_admin",
    "dlq_admin",
    "idempotency_admin",
    "limits_admin",
    "observability_admin",
    "runs_admin",
]
