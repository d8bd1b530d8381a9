"""System checks of delivery: the outbox and schedule settings, the poller, the broker."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import timedelta
from typing import Any

from django.core.checks import CheckMessage, Error, Warning

from celery_guard import conf
from celery_guard.core import checks as core_checks
from celery_guard.delivery import schedule
from celery_guard.delivery.poller import outbox_used

SCHEDULES = ("auto", "redis", "database", None)


def setting_errors() -> Iterable[str]:
    """Errors in the delivery settings (E001)."""
    for name in ("OUTBOX", "OUTBOX_FAST_PATH", "DELIVERY_POLLER"):
        if not isinstance(conf.raw(name), bool):
            yield f"CELERY_GUARD_{name} must be True or False"
    if conf.raw("SCHEDULE") not in SCHEDULES:
        yield f"CELERY_GUARD_SCHEDULE must be one of {SCHEDULES!r}, got {conf.raw('SCHEDULE')!r}"
    if not isinstance(conf.raw("SCHEDULE_REDIS_PREFIX"), str):
        yield "CELERY_GUARD_SCHEDULE_REDIS_PREFIX must be a str"
    for name in ("OUTBOX_GRACE", "OUTBOX_RETENTION", "DELIVERY_POLL_INTERVAL", "DELIVERY_LEASE"):
        value = conf.raw(name)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not (isinstance(value, timedelta) or number) or conf.GuardSettings.seconds(value) <= 0:
            yield f"CELERY_GUARD_{name} must be a positive number of seconds, got {value!r}"
    batch = conf.raw("DELIVERY_BATCH")
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        yield f"CELERY_GUARD_DELIVERY_BATCH must be a positive int, got {batch!r}"


check_setting_values = core_checks.setting_values_check(setting_errors)


def check_redis_schedule(app_configs: Sequence[Any] | None = None, **kw: Any) -> list[CheckMessage]:
    """E011: ``CELERY_GUARD_SCHEDULE = "redis"`` with a broker that is not Redis."""
    app = core_checks.celery_app()
    if conf.raw("SCHEDULE") != "redis" or schedule.is_redis(app):
        return []
    return [
        Error(
            "CELERY_GUARD_SCHEDULE is 'redis' but the broker is not Redis.",
            hint="The Redis schedule moves finished broker messages into the broker's Redis "
            "lists. Use 'auto' (or 'database') with this broker.",
            id="celery_guard.E011",
        )
    ]


def check_poller(app_configs: Sequence[Any] | None = None, **kw: Any) -> list[CheckMessage]:
    """W020: the workers' poller is off while the schedule or the outbox is in use."""
    app = core_checks.celery_app()
    if conf.raw("DELIVERY_POLLER") is not False:
        return []
    if conf.raw("SCHEDULE") is None and not outbox_used(app):
        return []
    return [
        Warning(
            "CELERY_GUARD_DELIVERY_POLLER is False: workers do not publish scheduled messages "
            "or outbox rows the fast path missed.",
            hint="Run `manage.py celery_guard relay` as a separate process, or set it to True.",
            id="celery_guard.W020",
        )
    ]


def check_key_prefix(app_configs: Sequence[Any] | None = None, **kw: Any) -> list[CheckMessage]:
    """W021: a Redis ``global_keyprefix`` with the Redis schedule."""
    app = core_checks.celery_app()
    if conf.raw("SCHEDULE") not in ("auto", "redis") or not schedule.is_redis(app):
        return []
    if not (app.conf.broker_transport_options or {}).get("global_keyprefix"):
        return []
    return [
        Warning(
            "The broker's global_keyprefix is set and the Redis schedule moves due messages "
            "into unprefixed queue lists, which no worker reads.",
            hint="Remove global_keyprefix, or set CELERY_GUARD_SCHEDULE = 'database'.",
            id="celery_guard.W021",
        )
    ]


#: This feature's checks, in the order they are registered.
CHECKS: tuple[core_checks.Check, ...] = (
    check_setting_values,
    check_redis_schedule,
    check_poller,
    check_key_prefix,
)
