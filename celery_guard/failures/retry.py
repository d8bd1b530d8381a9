"""Failure policy (pure): classify an exception, pick the backoff delay, decide retry or stop.

Classification order: the task's ``give_up_on`` / ``retry_on``; :class:`PermanentError` /
:class:`TransientError` (and :class:`ThrottledError`); the project's classifier
(``CELERY_GUARD_ERROR_CLASSIFIER``); the built-in table; ``CELERY_GUARD_UNKNOWN_ERRORS``.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from django.core.exceptions import ObjectDoesNotExist, PermissionDenied, ValidationError
from django.db import InterfaceError as DbInterfaceError
from django.db import OperationalError as DbOperationalError
from kombu.exceptions import OperationalError as KombuOperationalError

from celery_guard import backoff, durations
from celery_guard.core import options
from celery_guard.core.http import http_status, retry_after_of
from celery_guard.dlq.models import Reason
from celery_guard.exceptions import PermanentError, ThrottledError, TransientError

TRANSIENT = "transient"
PERMANENT = "permanent"
THROTTLED = "throttled"
KINDS = (TRANSIENT, PERMANENT, THROTTLED)

#: Errors of an unreachable broker or database: waiting fixes them, a dead letter does not.
_OUTAGES: tuple[type[BaseException], ...] = (
    ConnectionError,
    TimeoutError,
    socket.gaierror,
    socket.herror,
    KombuOperationalError,
    DbOperationalError,
    DbInterfaceError,
)
_BUILTIN_TRANSIENT = (*_OUTAGES, SoftTimeLimitExceeded, TimeLimitExceeded)

# Optional libraries are recognised by (top-level package, class name) anywhere in the
# exception's MRO, so classification works without importing them.
_DUCK_TRANSIENT = frozenset(
    {
        ("requests", "ConnectionError"),
        ("requests", "Timeout"),
        ("httpx", "TransportError"),
        ("redis", "ConnectionError"),
        ("redis", "TimeoutError"),
        ("amqp", "ConnectionError"),
    }
)

_BUILTIN_PERMANENT: tuple[type[BaseException], ...] = (
    ValueError,
    TypeError,
    LookupError,  # KeyError, IndexError
    ObjectDoesNotExist,
    PermissionDenied,
    ValidationError,
)

#: HTTP statuses worth retrying; 429 with a ``Retry-After`` is throttled.
TRANSIENT_STATUSES = frozenset({408, 425, 429})


@dataclass(frozen=True)
class Classification:
    """How an exception is treated.

    Attributes:
        kind: ``"transient"``, ``"permanent"`` or ``"throttled"``.
        rule: Which rule decided (``task``, ``exception``, ``classifier``, ``builtin``,
            ``http``, ``unknown``), for the logs.
        retry_after: Seconds the next attempt must wait at least, if the error says so.
    """

    kind: str
    rule: str
    retry_after: float | None = None


def _validate_exception_classes(value: Any) -> tuple[type[BaseException], ...]:
    items = value if isinstance(value, (tuple, list, set, frozenset)) else (value,)
    for item in items:
        if not (isinstance(item, type) and issubclass(item, BaseException)):
            raise TypeError(f"expected exception classes, got {item!r}")
    return tuple(items)


def _validate_max_attempts(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected a positive int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"must be >= 1 (the first run counts), got {value!r}")
    return value


def _validate_deadline(value: Any) -> float | None:
    return None if value is None else durations.seconds(value)


MAX_ATTEMPTS = options.GuardOption(
    "max_attempts", _validate_max_attempts, setting="MAX_ATTEMPTS", per_call=False
)
BACKOFF = options.GuardOption("backoff", backoff.parse, setting="BACKOFF", per_call=False)
DEADLINE = options.GuardOption("deadline", _validate_deadline, setting="DEADLINE", per_call=False)
RETRY_ON = options.GuardOption("retry_on", _validate_exception_classes, default=(), per_call=False)
GIVE_UP_ON = options.GuardOption(
    "give_up_on", _validate_exception_classes, default=(), per_call=False
)

#: The guard options of the failure pipeline.
OPTIONS = (MAX_ATTEMPTS, BACKOFF, DEADLINE, RETRY_ON, GIVE_UP_ON)


@dataclass(frozen=True)
class Policy:
    """The effective failure policy of a task."""

    max_attempts: int = 5
    backoff: backoff.Policy = field(default_factory=backoff.Exponential)
    deadline: float | None = None
    retry_on: tuple[type[BaseException], ...] = ()
    give_up_on: tuple[type[BaseException], ...] = ()
    unknown: str = TRANSIENT
    max_throttled: int = 50
    classifier: Callable[[BaseException], Any] | None = None


def policy_for(task_options: Mapping[str, Any], **project: Any) -> Policy:
    """Resolve a task's policy: decorator options > settings > built-in defaults.

    Args:
        task_options: The task's validated guard options.
        **project: ``unknown``, ``max_throttled`` and ``classifier`` from the settings.
    """
    values = {
        option.name: options.validate_value(
            option, option.resolve({}, task_options), where="settings"
        )
        for option in OPTIONS
    }
    return Policy(**values, **project)


def is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` says a broker, a database or a network is unreachable."""
    return isinstance(exc, _OUTAGES) or _duck_match(exc)


def _duck_match(exc: BaseException) -> bool:
    for cls in type(exc).__mro__:
        package = (cls.__module__ or "").split(".", 1)[0]
        if (package, cls.__name__) in _DUCK_TRANSIENT:
            return True
    return False


def builtin_kind(exc: BaseException, retry_after: float | None) -> tuple[str, str] | None:
    """Classify by the built-in table; None when no built-in rule applies."""
    status = http_status(exc)
    if status is not None:
        if status == 429 and retry_after is not None:
            return THROTTLED, "http"
        if status in TRANSIENT_STATUSES or 500 <= status <= 599:
            return TRANSIENT, "http"
        if 400 <= status <= 499:
            return PERMANENT, "http"
    if isinstance(exc, _BUILTIN_TRANSIENT) or _duck_match(exc):
        return TRANSIENT, "builtin"
    if isinstance(exc, _BUILTIN_PERMANENT):
        return PERMANENT, "builtin"
    return None


def classify(exc: BaseException, policy: Policy, *, now: float) -> Classification:
    """Classify ``exc`` under ``policy`` (see the module docstring for the order).

    Raises:
        ValueError: The project classifier returned something other than a kind or None.
    """
    retry_after = retry_after_of(exc, now)
    if policy.give_up_on and isinstance(exc, policy.give_up_on):
        return Classification(PERMANENT, "task")
    if policy.retry_on and isinstance(exc, policy.retry_on):
        return Classification(TRANSIENT, "task", retry_after)
    if isinstance(exc, PermanentError):
        return Classification(PERMANENT, "exception")
    if isinstance(exc, ThrottledError):
        return Classification(THROTTLED, "exception", retry_after)
    if isinstance(exc, TransientError):
        return Classification(TRANSIENT, "exception", retry_after)
    if policy.classifier is not None:
        kind = policy.classifier(exc)
        if kind is not None:
            if kind not in KINDS:
                raise ValueError(
                    f"CELERY_GUARD_ERROR_CLASSIFIER returned {kind!r}; expected one of "
                    f"{', '.join(map(repr, KINDS))} or None"
                )
            return Classification(kind, "classifier", retry_after)
    found = builtin_kind(exc, retry_after)
    if found is not None:
        return Classification(found[0], found[1], retry_after)
    return Classification(policy.unknown, "unknown", retry_after)


@dataclass(frozen=True)
class Decision:
    """What to do after a failed attempt.

    Attributes:
        retry: Whether to publish another attempt.
        delay: Seconds before that attempt (retries only).
        reason: Dead-letter reason (stops only).
        classification: How the error was classified.
        consumed: Attempts consumed, counting this one if it consumed one.
        throttled: Throttled reschedules so far, counting this one if it was one.
    """

    retry: bool
    classification: Classification
    consumed: int
    throttled: int
    delay: float = 0.0
    reason: str | None = None


def decide(
    classification: Classification,
    policy: Policy,
    *,
    consumed_before: int,
    throttled_before: int,
    first_enqueued_at: float | None,
    now: float,
    rng: random.Random | None = None,
) -> Decision:
    """Decide whether a failed attempt is retried (and when) or dead-lettered (and why).

    A throttled error does not consume an attempt until ``max_throttled`` throttled
    reschedules have happened; no retry is scheduled to start past the deadline.
    """
    kind = classification.kind
    if kind == PERMANENT:
        return Decision(
            False, classification, consumed_before + 1, throttled_before, reason=Reason.PERMANENT
        )
    throttle = kind == THROTTLED and throttled_before < policy.max_throttled
    consumed = consumed_before if throttle else consumed_before + 1
    throttled = throttled_before + 1 if throttle else throttled_before
    if not throttle and consumed >= policy.max_attempts:
        return Decision(False, classification, consumed, throttled, reason=Reason.EXHAUSTED)
    delay = policy.backoff.delay(max(consumed, 1), rng)
    if classification.retry_after is not None:
        delay = max(delay, classification.retry_after)
    if (
        policy.deadline is not None
        and first_enqueued_at is not None
        and now + delay > first_enqueued_at + policy.deadline
    ):
        return Decision(False, classification, consumed, throttled, reason=Reason.DEADLINE)
    return Decision(True, classification, consumed, throttled, delay=delay)


def longest_delay(task_options: Mapping[str, Any], default: Any) -> float:
    """The longest backoff delay a task can schedule (for the visibility-timeout check)."""
    value = task_options.get("backoff", default)
    return backoff.parse(value).longest()


def qualified_name(cls: type) -> str:
    """``module.QualName`` of a class, as stored in dead letters."""
    return f"{cls.__module__}.{cls.__qualname__}"
