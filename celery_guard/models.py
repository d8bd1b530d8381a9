"""Every model of celery_guard, each defined in its feature's own ``models`` module."""

from celery_guard.beat.models import BeatFire, BeatLease
from celery_guard.dlq.models import DeadLetter, DeadLetterReplay
from celery_guard.failures.models import Delivery
from celery_guard.idempotency.models import IdempotencyRecord
from celery_guard.observability.models import Alert, Dashboard, TaskMinute

__all__ = [
    "Alert",
    "BeatFire",
    "BeatLease",
    "Dashboard",
    "DeadLetter",
    "DeadLetterReplay",
    "Delivery",
    "IdempotencyRecord",
    "TaskMinute",
]
