"""Sentry cron check-ins of guarded beat entries, sent by the worker that runs the slot.

An entry whose policy sets ``sentry_monitor`` (``CELERY_GUARD_BEAT_POLICIES``) reports each
slot's run: ``in_progress`` when a delivery starts, ``ok`` or ``error`` when the run reaches a
final state (a retry is neither: the next delivery reports again). The check-in id is derived
from the slot's key, so the deliveries of one slot (retries, redeliveries, other pool
processes) report the same check-in. The first check-in carries the entry's schedule as the
monitor's configuration, so Sentry creates or updates the monitor and notices slots that
never started. Nothing happens unless sentry-sdk is installed and initialised.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from typing import Any

from celery import states

from celery_guard.beat import slots
from celery_guard.conf import guard_settings
from celery_guard.observability import sentry

logger = logging.getLogger(__name__)

#: Namespace of the check-in ids (uuid5 of the slot key).
NAMESPACE = uuid.UUID("6d1f1c0e-3f57-4c8e-9a55-0c6b2d1c9e21")
#: Interval periods of django-celery-beat -> (Sentry's unit, seconds per unit of the period).
_MINUTES_PER = {"minutes": 1, "hours": 60, "days": 1440}


def check_in_id(key: str) -> str:
    """The check-in id of the slot whose key (``beat:<entry>:<slot>``) is ``key``."""
    return uuid.uuid5(NAMESPACE, key).hex


def _slug(beat: Mapping[str, Any]) -> str | None:
    entry = beat.get("entry")
    if not isinstance(entry, str) or not isinstance(beat.get("key"), str):
        return None
    return slots.monitor_slug(entry, slots.policy_for(entry, guard_settings.beat_policies))


def monitor_config(entry: str) -> dict[str, Any] | None:
    """The Sentry monitor configuration of entry ``entry`` (``None``: not expressible)."""
    from django_celery_beat.models import PeriodicTask

    task = PeriodicTask.objects.select_related("crontab", "interval").filter(name=entry).first()
    if task is None:
        return None
    if task.crontab is not None:
        cron = task.crontab
        value = " ".join(
            str(part)
            for part in (
                cron.minute,
                cron.hour,
                cron.day_of_month,
                cron.month_of_year,
                cron.day_of_week,
            )
        )
        return {
            "schedule": {"type": "crontab", "value": value},
            "timezone": str(cron.timezone),
        }
    if task.interval is not None:
        every, period = int(task.interval.every), str(task.interval.period)
        if period in _MINUTES_PER:
            return {"schedule": {"type": "interval", "value": every, "unit": period[:-1]}}
        if period == "seconds" and every % 60 == 0 and every > 0:
            return {"schedule": {"type": "interval", "value": every // 60, "unit": "minute"}}
    # Sentry schedules count minutes at least; solar and clocked schedules have no form.
    return None


def started(beat: Mapping[str, Any]) -> str | None:
    """A delivery of a beat-fired run starts: ``in_progress`` (the check-in id, if sent)."""
    slug = _slug(beat)
    if slug is None or not sentry.enabled():
        return None
    config = monitor_config(str(beat["entry"]))
    return sentry.checkin(slug, check_in_id(str(beat["key"])), "in_progress", monitor_config=config)


def finished(beat: Mapping[str, Any], state: str | None) -> str | None:
    """A delivery ended: ``ok`` or ``error`` once the run is final (a retry sends nothing)."""
    if state not in states.READY_STATES:
        return None
    slug = _slug(beat)
    if slug is None or not sentry.enabled():
        return None
    status = "ok" if state == states.SUCCESS else "error"
    return sentry.checkin(slug, check_in_id(str(beat["key"])), status)
