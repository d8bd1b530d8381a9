"""Bulk runs: one operation over many items, with progress, per-item errors and a completion.

``celery_guard.start_run``, ``celery_guard.runs.retry_failed``, ``celery_guard.runs.cancel``
and ``celery_guard.runs.summary`` are public (see ``docs/runs.md``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from celery_guard.runs.launch import cancel, retry_failed, start_run, summary

__all__ = ["cancel", "retry_failed", "start_run", "summary"]


def __getattr__(name: str) -> Any:
    # Loaded on first use: the services import the models, which need Django's apps ready.
    if name in __all__:
        from celery_guard.runs import launch

        return getattr(launch, name)
    raise AttributeError(f"module 'celery_guard.runs' has no attribute {name!r}")
