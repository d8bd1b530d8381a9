"""Exception types that celery_guard raises to callers."""

from __future__ import annotations


class GuardError(Exception):
    """Base class of every error celery_guard raises on purpose."""


class PayloadError(GuardError, ValueError):
    """Task arguments cannot be published: not plain JSON, or too large.

    Raised at enqueue time, before anything reaches the broker.
    """
