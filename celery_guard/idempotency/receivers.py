"""Receivers of the idempotency feature: free the key of a dead-lettered run."""

from __future__ import annotations

import logging
from typing import Any

from celery_guard import signals as guard_signals
from celery_guard.conf import guard_settings
from celery_guard.idempotency import dedup

logger = logging.getLogger("celery_guard.receivers")


def release_dead_lettered_key(
    sender: Any = None,
    task_name: str | None = None,
    task_id: str | None = None,
    idempotency_key: str | None = None,
    reason: str | None = None,
    **kw: Any,
) -> None:
    """Release the key of a dead-lettered run, so a corrected resubmission or replay can run.

    Only while that run still holds the key, and never a key that succeeded (its effect
    committed: a replay of it must stay a skip); off with
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
    logger.info("celery_guard: %s[%s] dead-lettered (%s)", task_name, task_id, reason)
    dedup.release(idempotency_key, task_id, keep_succeeded=True)


def connect() -> None:
    """Connect the receivers; ``dispatch_uid`` makes repeated calls harmless."""
    guard_signals.dead_lettered.connect(
        release_dead_lettered_key,
        dispatch_uid="celery_guard.release_dead_lettered_key",
        weak=False,
    )
