"""Idempotency keys with dedup windows: publish a key once, run its body once.

``celery_guard.idempotency.release(key, task_id=None)`` is public: it frees a key so a new
call with it runs again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from celery_guard.idempotency.dedup import release

__all__ = ["release"]


def __getattr__(name: str) -> Any:
    # Loaded on first use: the ledger imports the models, which need Django's apps ready.
    if name == "release":
        from celery_guard.idempotency.dedup import release

        return release
    raise AttributeError(f"module 'celery_guard.idempotency' has no attribute {name!r}")
