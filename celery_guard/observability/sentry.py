"""Sentry (the ``sentry`` extra): final failures become events, retries breadcrumbs.

Nothing happens unless the project called ``sentry_sdk.init`` itself. A dead-lettered run is
captured once, tagged with task, queue, attempt, reason and tenant, with one breadcrumb per
failed attempt from the guard header's history; the event id goes on the dead letter.
Retries are never events: in the process that retries they are breadcrumbs, and the guard's
own log records are kept out of Sentry's logging integration (they would duplicate them).
:func:`checkin` sends the cron check-ins of guarded beat entries (``celery_guard.beat.crons``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, cast

from celery_guard.observability import context
from celery_guard.observability.events import Event

logger = logging.getLogger(__name__)

#: Loggers whose records repeat what the guard reports to Sentry itself.
DUPLICATE_LOGGERS = ("celery_guard", "celery_guard.dlq.records")


def _sdk() -> Any:
    try:
        import sentry_sdk
    except ImportError:
        return None
    return sentry_sdk if sentry_sdk.is_initialized() else None


def enabled() -> bool:
    """Whether sentry-sdk is installed and the project initialised it."""
    return _sdk() is not None


def install() -> None:
    """Keep the guard's event records out of Sentry's logging integration."""
    try:
        from sentry_sdk.integrations.logging import ignore_logger
    except ImportError:
        return
    for name in DUPLICATE_LOGGERS:
        ignore_logger(name)


def breadcrumb(event: Event, fields: Mapping[str, Any]) -> None:
    """Subscriber: a retry (or a deferral) becomes a breadcrumb, never an event."""
    if event.name not in ("retry_scheduled", "throttled", "deferred", "worker_lost"):
        return
    sdk = _sdk()
    if sdk is None:
        return
    sdk.add_breadcrumb(
        category="celery_guard",
        message=f"{event.name} {fields.get('task_name')}[{fields.get('task_id')}]",
        level="warning",
        data={k: v for k, v in fields.items() if v is not None},
    )


def capture_final(
    exc: BaseException,
    *,
    reason: str,
    dead_letter_id: int | None = None,
    history: Sequence[Mapping[str, Any]] = (),
) -> str | None:
    """Capture a final failure as one Sentry event; return its id (``None`` without Sentry)."""
    sdk = _sdk()
    if sdk is None:
        return None
    run = context.current()
    fields = run.fields() if run is not None else {}
    try:
        with sdk.new_scope() as scope:
            for key in ("task_name", "queue", "attempt", "tenant", "request_id"):
                if fields.get(key) is not None:
                    scope.set_tag(f"celery_guard.{key}", str(fields[key]))
            scope.set_tag("celery_guard.reason", reason)
            if fields.get("task_id"):
                scope.set_tag("celery_guard.task_id", str(fields["task_id"]))
            if dead_letter_id is not None:
                scope.set_extra("dead_letter_id", dead_letter_id)
            for entry in history:
                scope.add_breadcrumb(
                    category="celery_guard",
                    message=f"attempt {entry.get('attempt')} failed: {entry.get('error')}",
                    level="warning",
                    data={k: entry.get(k) for k in ("kind", "delay", "at")},
                )
            event_id = sdk.capture_exception(exc)
    except Exception:
        logger.exception("celery_guard: could not report a final failure to Sentry")
        return None
    return str(event_id) if event_id else None


def checkin(
    slug: str,
    check_in_id: str,
    status: str,
    *,
    monitor_config: Mapping[str, Any] | None = None,
) -> str | None:
    """Send one cron check-in (``in_progress``, ``ok``, ``error``); ``None`` without Sentry."""
    sdk = _sdk()
    if sdk is None:
        return None
    try:
        from sentry_sdk.crons import capture_checkin

        sent = capture_checkin(
            monitor_slug=slug,
            check_in_id=check_in_id,
            status=status,
            monitor_config=cast(Any, dict(monitor_config)) if monitor_config else None,
        )
    except Exception:
        logger.exception("celery_guard: could not send a Sentry cron check-in for %s", slug)
        return None
    return str(sent) if sent else None
