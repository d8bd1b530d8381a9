"""Every feature's Celery and Django signal receivers, connected once from ``AppConfig.ready()``."""

from __future__ import annotations

from celery import signals

from celery_guard.beat import receivers as beat
from celery_guard.core import dbreuse
from celery_guard.delivery import receivers as delivery
from celery_guard.dlq import receivers as dlq
from celery_guard.failures import receivers as failures
from celery_guard.idempotency import receivers as idempotency
from celery_guard.observability import receivers as observability
from celery_guard.runs import receivers as runs


def connect() -> None:
    """Connect every receiver; each feature's ``dispatch_uid`` makes repeated calls harmless."""
    for feature in (observability, failures, beat, dlq, idempotency, delivery, runs):
        feature.connect()
    # Worker database connections (every feature's, and the project's own).
    signals.worker_init.connect(
        dbreuse.on_worker_init, dispatch_uid="celery_guard.db_reuse", weak=False
    )
    signals.task_postrun.connect(
        dbreuse.close_unusable, dispatch_uid="celery_guard.close_unusable", weak=False
    )
