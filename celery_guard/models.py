"""Every model of celery_guard, each defined in its feature's own ``models`` module."""

from celery_guard.beat.models import BeatFire, BeatLease
from celery_guard.delivery.models import DeliveryLease, OutboxMessage
from celery_guard.dlq.models import DeadLetter, DeadLetterReplay
from celery_guard.failures.models import Delivery
from celery_guard.idempotency.models import IdempotencyRecord
from celery_guard.limits.models import LimitEntry, LimitScope, TaskPolicy
from celery_guard.observability.models import Alert, Dashboard, TaskMinute
from celery_guard.runs.models import BulkRun, BulkRunItem

__all__ = [
    "Alert",
    "BeatFire",
    "BeatLease",
    "BulkRun",
    "BulkRunItem",
    "Dashboard",
    "DeadLetter",
    "DeadLetterReplay",
    "Delivery",
    "DeliveryLease",
    "IdempotencyRecord",
    "LimitEntry",
    "LimitScope",
    "OutboxMessage",
    "TaskMinute",
    "TaskPolicy",
]
