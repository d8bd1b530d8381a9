"""Celery signal receivers, connected once from ``AppConfig.ready()``."""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import signals

from celery_guard import failures, fires, headers
from celery_guard import signals as guard_signals
from celery_guard.conf import guard_settings

logger = logging.getLogger(__name__)


def log_start(sender: Any = None, task_id: str | None = None, task: Any = None, **kw: Any) -> None:
    """Log when a guarded task starts, with its attempt and its lag since the first enqueue."""
    guard = headers.read(getattr(task.request, "headers", None)) if task is not None else {}
    if not guard:
        return
    first = guard.get("first_enqueued_at")
    lag = time.time() - first if isinstance(first, (int, float)) else None
    logger.info(
        "celery_guard: %s[%s] started: attempt %s, priority %s, %.3fs after first enqueue",
        getattr(task, "name", sender),
        task_id,
        guard.get("attempt"),
        guard.get("priority"),
        lag if lag is not None else float("nan"),
    )


def _request_headers(task: Any) -> Any:
    return getattr(getattr(task, "request", None), "headers", None)


def beat_run_started(task: Any = None, **kw: Any) -> None:
    """Mark the fire record of a beat-fired task as started (for the overlap policy)."""
    message_headers = _request_headers(task)
    if not message_headers or fires.BEAT_HEADER not in message_headers:
        return
    try:
        fires.record_start(message_headers)
    except Exception:  # bookkeeping must never fail the task itself
        logger.exception("celery_guard: could not record the start of a beat-fired task")


def beat_run_finished(task: Any = None, state: str | None = None, **kw: Any) -> None:
    """Mark the fire record of a beat-fired task as finished once it reaches a final state."""
    message_headers = _request_headers(task)
    if not message_headers or fires.BEAT_HEADER not in message_headers:
        return
    try:
        fires.record_finish(message_headers, state)
    except Exception:  # bookkeeping must never fail the task itself
        logger.exception("celery_guard: could not record the end of a beat-fired task")


def release_dead_lettered_key(
    sender: Any = None,
    task_name: str | None = None,
    task_id: str | None = None,
    idempotency_key: str | None = None,
    reason: str | None = None,
    **kw: Any,
) -> None:
    """Release the key of a dead-lettered run, so a corrected resubmission or replay can run.

    Only while that run still holds the key; off with
    ``CELERY_GUARD_RELEASE_ON_DEAD_LETTER = False``.
    """
    if not idempotency_key:
        return
    if not guard_settings.release_on_dead_letter:
        logger.info(
            "celery_guard: %s[%s] dead-lettered (%s); key %r kept "
            "(CELERY_GUARD_RELEASE_ON_DEAD_LETTER is off)",
            task_name,
            task_id,
            reason,
            idempotency_key,
        )
        return
    from celery_guard import idempotency

    logger.info("celery_guard: %s[%s] dead-lettered (%s)", task_name, task_id, reason)
    idempotency.release(idempotency_key, task_id)


def connect() -> None:
    """Connect every receiver; ``dispatch_uid`` makes repeated calls harmless."""
    signals.task_prerun.connect(log_start, dispatch_uid="celery_guard.log_start", weak=False)
    # Only unguarded tasks (CELERY_GUARD_CAPTURE_UNGUARDED): guarded ones are recorded from
    # the task call itself, where a failed write can keep the message.
    signals.task_failure.connect(
        failures.capture_unguarded, dispatch_uid="celery_guard.capture_unguarded", weak=False
    )
    signals.task_prerun.connect(
        beat_run_started, dispatch_uid="celery_guard.beat_run_started", weak=False
    )
    signals.task_postrun.connect(
        beat_run_finished, dispatch_uid="celery_guard.beat_run_finished", weak=False
    )
    guard_signals.dead_lettered.connect(
        release_dead_lettered_key,
        dispatch_uid="celery_guard.release_dead_lettered_key",
        weak=False,
    )
