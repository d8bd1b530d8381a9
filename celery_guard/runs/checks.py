"""System checks of bulk runs: their settings."""

from __future__ import annotations

from collections.abc import Iterable

from celery_guard.core import checks as core_checks


def setting_errors() -> Iterable[str]:
    """Errors in the bulk runs' settings (reported as ``celery_guard.E001``)."""
    yield from core_checks.duration_errors(("RUNS_RETENTION_DAYS", "RUNS_SWEEP_GRACE"))


check_setting_values = core_checks.setting_values_check(setting_errors)

#: This feature's checks, in the order they are registered.
CHECKS: tuple[core_checks.Check, ...] = (check_setting_values,)
