"""Receivers of the failure feature: record failed unguarded tasks, when asked to."""

from __future__ import annotations

from celery import signals

from celery_guard.failures import handler


def connect() -> None:
    """Connect the receivers; ``dispatch_uid`` makes repeated calls harmless."""
    # Only unguarded tasks (CELERY_GUARD_CAPTURE_UNGUARDED): guarded ones are recorded from
    # the task call itself, where a failed write can keep the message.
    signals.task_failure.connect(
        handler.capture_unguarded, dispatch_uid="celery_guard.capture_unguarded", weak=False
    )
