"""Subscribe the log, metrics, Sentry and rollup writers to the guard's events."""

from __future__ import annotations

import os
from typing import Any

from celery import signals

from celery_guard.conf import guard_settings
from celery_guard.observability import events, logs, metrics, rollups, sentry


def _process_shutdown(**kw: Any) -> None:
    """A pool process exits: write its pending rollups, drop its live gauges."""
    rollups.flush()
    metrics.mark_process_dead(os.getpid())


def connect() -> None:
    """Subscribe the writers the settings enable; repeated calls replace, never duplicate."""
    events.subscribe(logs.log_event, uid="logs")
    if metrics.enabled():
        events.subscribe(metrics.record, uid="metrics")
    else:
        events.unsubscribe("metrics")
    if guard_settings.rollups:
        events.subscribe(rollups.record, uid="rollups")
    else:
        events.unsubscribe("rollups")
    sentry.install()
    events.subscribe(sentry.breadcrumb, uid="sentry")
    signals.worker_process_shutdown.connect(
        _process_shutdown, dispatch_uid="celery_guard.observability.shutdown", weak=False
    )
    signals.worker_shutdown.connect(
        _process_shutdown, dispatch_uid="celery_guard.observability.worker_shutdown", weak=False
    )
