"""Exception types that celery_guard raises to callers."""

from __future__ import annotations

from typing import Any

from celery.exceptions import Retry


class GuardError(Exception):
    """Base class of every error celery_guard raises on purpose."""


class PayloadError(GuardError, ValueError):
    """Task arguments cannot be published: not plain JSON, or too large.

    Raised at enqueue time, before anything reaches the broker.
    """


class TransientError(GuardError):
    """Raise from a guarded task for a failure worth retrying (a later attempt may succeed).

    Args:
        message: What went wrong.
        retry_after: Seconds (or an HTTP date string, or an aware ``datetime``) before which
            the next attempt must not start; it raises the backoff delay to at least that.
    """

    def __init__(self, message: str = "", *, retry_after: Any = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ThrottledError(TransientError):
    """A transient failure caused by a rate limit: rescheduled without consuming an attempt.

    Throttled reschedules are still bounded by the task's ``deadline`` and by
    ``CELERY_GUARD_MAX_THROTTLED``.
    """


class PermanentError(GuardError):
    """Raise from a guarded task for a failure no retry can fix: it is dead-lettered at once."""


class PoisonMessageError(GuardError):
    """The message's deliveries kept killing the worker process; it was dead-lettered unrun."""


class InvalidHeaderError(GuardError):
    """The message's guard header (or task id) holds values the guard never writes.

    A forged or corrupt message: it is dead-lettered (reason ``invalid_header``) unrun.
    """


class RepublishError(GuardError):
    """The retry of a failed attempt could not be published for a reason no redelivery fixes.

    For example its priority level is no longer in ``CELERY_GUARD_PRIORITY_QUEUES``; the
    message is dead-lettered (reason ``republish_failed``).
    """


class HardTimeLimitError(GuardError):
    """The last attempt was killed at its hard time limit; the task was dead-lettered.

    Raised instead of Celery's ``TimeLimitExceeded``, which would make the worker requeue the
    message of a guarded task (``acks_on_timeout = False``).
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


class RunItemError(GuardError, ValueError):
    """An item given to ``start_run`` cannot be published; nothing of the run was written.

    Attributes:
        index: Position of the bad item in ``items`` (0-based).
    """

    def __init__(self, message: str, *, index: int) -> None:
        super().__init__(message)
        self.index = index


class Deferral(Retry):  # type: ignore[misc]
    """A delivery put off by a limit or a pause: republished later, not an attempt.

    Raised inside the guard pipeline (the limits step); Celery handles it as any ``Retry``
    (the message is acked, the new one is published), and the steps around it know that
    the body did not run.
    """
