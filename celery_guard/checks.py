"""Every system check of celery_guard, each defined in its feature's own ``checks`` module."""

from celery_guard.beat import checks as beat
from celery_guard.core import checks as core
from celery_guard.core.checks import Check
from celery_guard.delivery import checks as delivery
from celery_guard.dlq import checks as dlq
from celery_guard.failures import checks as failures
from celery_guard.idempotency import checks as idempotency
from celery_guard.limits import checks as limits
from celery_guard.observability import checks as observability
from celery_guard.routing import checks as routing
from celery_guard.runs import checks as runs

#: Every check, in the order ``AppConfig.ready()`` registers them.
ALL: tuple[Check, ...] = (
    *core.CHECKS,
    *failures.CHECKS,
    *routing.CHECKS,
    *beat.CHECKS,
    *idempotency.CHECKS,
    *dlq.CHECKS,
    *observability.CHECKS,
    *runs.CHECKS,
    *delivery.CHECKS,
    *limits.CHECKS,
)
