"""Maintenance tasks of celery_guard, found by Celery's autodiscovery."""

from __future__ import annotations

from celery import shared_task

from celery_guard.idempotency import dedup
from celery_guard.observability import alerts
from celery_guard.runs import launch


@shared_task(name="celery_guard.purge_idempotency_records", ignore_result=True)  # type: ignore[untyped-decorator]
def purge_idempotency_records() -> int:
    """Delete idempotency records past their window and retention (schedule it with beat)."""
    return dedup.purge()


@shared_task(name="celery_guard.evaluate_slos", ignore_result=True)  # type: ignore[untyped-decorator]
def evaluate_slos() -> int:
    """Evaluate ``CELERY_GUARD_SLOS`` once (schedule it with beat, e.g. every minute)."""
    summary = alerts.evaluate()
    return len(summary.raised)


@shared_task(name="celery_guard.sweep_runs", ignore_result=True)  # type: ignore[untyped-decorator]
def sweep_runs() -> dict[str, int]:
    """Publish bulk-run items and completions a dead process left (schedule it every minute)."""
    return launch.sweep()
