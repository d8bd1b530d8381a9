"""System checks of bulk runs: their settings."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta

from celery_guard import conf
from celery_guard.core import checks as core_checks


def setting_errors() -> Iterable[str]:
    """Errors in the bulk runs' settings (reported as ``celery_guard.E001``)."""
    days = conf.raw("RUNS_RETENTION_DAYS")
    if isinstance(days, bool) or not isinstance(days, (int, float)) or days <= 0:
        yield f"CELERY_GUARD_RUNS_RETENTION_DAYS must be a positive number, got {days!r}"
    grace = conf.raw("RUNS_SWEEP_GRACE")
    seconds = grace.total_seconds() if isinstance(grace, timedelta) else grace
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds < 0:
        yield (
            f"CELERY_GUARD_RUNS_SWEEP_GRACE must be seconds (>= 0) or a timedelta, got {grace!r}"
        )


check_setting_values = core_checks.setting_values_check(setting_errors)

#: This feature's checks, in the order they are registered.
CHECKS: tuple[core_checks.Check, ...] = (check_setting_values,)
