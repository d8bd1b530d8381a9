"""Exception types that celery_guard raises to callers."""

from __future__ import annotations


class GuardError(Exception):
    """Base class of every error celery_guard raises on purpose."""


class PayloadError(GuardError, ValueError):
    """Task arguments cannot be published: not plain JSON, or too large.

    Raised at enqueue time, before anything reaches the broker.
    """


class IdempotencyKeyError(GuardError, ValueError):
    """The idempotency key of a call cannot be derived: a value is missing or the key is empty.

    Raised at enqueue time, before anything is claimed or published.
    """


class IdempotencyConflict(GuardError):
    """The idempotency key is already taken, inside its window, by a call with other arguments.

    Raised at enqueue time, before anything is published (Stripe's semantics). Attributes:
    ``key`` and ``task_id`` (the task that holds the key).
    """

    def __init__(self, message: str, *, key: str, task_id: str) -> None:
        super().__init__(message)
        self.key = key
        self.task_id = task_id


class LeaseLost(GuardError):
    """A run tried to complete an idempotency key it no longer owns (it was taken over).

    Raised by ``self.guard.atomic()`` so the stale attempt's writes roll back.
    """
