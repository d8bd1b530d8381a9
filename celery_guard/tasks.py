"""Maintenance tasks of celery_guard, found by Celery's autodiscovery."""

from __future__ import annotations

from celery import shared_task

from celery_guard.idempotency import dedup


@shared_task(name="celery_guard.purge_idempotency_records", ignore_result=True)  # type: ignore[untyped-decorator]
def purge_idempotency_records() -> int:
    """Delete idempotency records past their window and retention (schedule it with beat)."""
    return dedup.purge()
