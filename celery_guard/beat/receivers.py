"""Celery signal receivers that record when a beat-fired run starts and ends (and tell Sentry)."""

from __future__ import annotations

import logging
from typing import Any

from celery import signals

from celery_guard.beat import crons, fires, lease
from celery_guard.core import headers
from celery_guard.observability import providers

logger = logging.getLogger("celery_guard.receivers")


def _request_headers(task: Any) -> Any:
    return getattr(getattr(task, "request", None), "headers", None)


def beat_run_started(task: Any = None, **kw: Any) -> None:
    """Mark the fire record of a beat-fired task as started (for the overlap policy)."""
    message_headers = _request_headers(task)
    beat = headers.read(message_headers).get(headers.BEAT)
    if not beat:
        return
    try:
        fires.record_start(beat)
    except Exception:  # bookkeeping must never fail the task itself
        logger.exception("celery_guard: could not record the start of a beat-fired task")
    try:
        crons.started(beat)
    except Exception:
        logger.exception("celery_guard: could not send the cron check-in of a beat-fired task")


def beat_run_finished(task: Any = None, state: str | None = None, **kw: Any) -> None:
    """Mark the fire record of a beat-fired task as finished once it reaches a final state."""
    message_headers = _request_headers(task)
    beat = headers.read(message_headers).get(headers.BEAT)
    if not beat:
        return
    try:
        fires.record_finish(beat, state)
    except Exception:  # bookkeeping must never fail the task itself
        logger.exception("celery_guard: could not record the end of a beat-fired task")
    try:
        crons.finished(beat, state)
    except Exception:
        logger.exception("celery_guard: could not send the cron check-in of a beat-fired task")


def connect() -> None:
    """Connect the receivers; ``dispatch_uid`` makes repeated calls harmless."""
    providers.register("beat_leaders", lease.leaders)
    providers.register("slot_lateness", fires.lateness)
    signals.task_prerun.connect(
        beat_run_started, dispatch_uid="celery_guard.beat_run_started", weak=False
    )
    signals.task_postrun.connect(
        beat_run_finished, dispatch_uid="celery_guard.beat_run_finished", weak=False
    )
