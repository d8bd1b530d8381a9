"""The guarded celery-beat scheduler: one leader behind a database lease, each slot once.

``celery_guard.beat:GuardedScheduler`` is the scheduler's public path (``beat_scheduler``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from celery_guard.beat.scheduler import GuardedScheduler

__all__ = ["GuardedScheduler"]


def __getattr__(name: str) -> Any:
    # django-celery-beat's scheduler imports its models: loaded on first use, so the pure
    # modules of this package (slots) import before Django's apps are ready.
    if name == "GuardedScheduler":
        from celery_guard.beat.scheduler import GuardedScheduler

        return GuardedScheduler
    raise AttributeError(f"module 'celery_guard.beat' has no attribute {name!r}")
