"""Celery signal receivers that report guarded runs in the logs."""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import signals

from celery_guard.core import headers

logger = logging.getLogger("celery_guard.receivers")


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


def connect() -> None:
    """Connect the receivers; ``dispatch_uid`` makes repeated calls harmless."""
    signals.task_prerun.connect(log_start, dispatch_uid="celery_guard.log_start", weak=False)
