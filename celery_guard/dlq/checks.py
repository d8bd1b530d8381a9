"""System checks of the dead-letter queue: redaction, the Sentry link, retention."""

from __future__ import annotations

from collections.abc import Iterable

from celery_guard import conf
from celery_guard.core import checks as core_checks


def setting_errors() -> Iterable[str]:
    """Errors in the dead-letter queue's settings."""
    fields = conf.raw("REDACT_FIELDS")
    if isinstance(fields, str) or not (
        isinstance(fields, (list, tuple, frozenset, set))
        and all(isinstance(f, str) and f for f in fields)
    ):
        yield f"CELERY_GUARD_REDACT_FIELDS must be a list of non-empty strings, got {fields!r}"
    for name in ("REDACTOR", "SENTRY_EVENT_URL"):
        value = conf.raw(name)
        if value is not None and not isinstance(value, str):
            yield f"CELERY_GUARD_{name} must be None or a string, got {value!r}"
    url = conf.raw("SENTRY_EVENT_URL")
    if isinstance(url, str) and "{event_id}" not in url:
        yield "CELERY_GUARD_SENTRY_EVENT_URL must contain '{event_id}'"
    if isinstance(url, str) and not conf.is_http_url(url):
        yield f"CELERY_GUARD_SENTRY_EVENT_URL must be an http:// or https:// URL, got {url!r}"
    yield from core_checks.duration_errors(("DLQ_RETENTION_DAYS",))


check_setting_values = core_checks.setting_values_check(setting_errors)


#: This feature's checks, in the order they are registered.
CHECKS: tuple[core_checks.Check, ...] = (check_setting_values,)
