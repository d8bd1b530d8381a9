"""Backoff policies: how long a guarded task waits before its next attempt (pure, no Django)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from celery_guard import durations


class BackoffPolicy(Protocol):
    """A delay schedule; ``attempt`` is the number of consumed attempts so far (1 or more)."""

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before the attempt that follows ``attempt`` failed ones."""

    def longest(self) -> float:
        """The largest delay this policy can return."""


def _non_negative(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, got {type(value).__name__}")
    try:
        return durations.seconds(value, allow_minimum=True)
    except ValueError as exc:
        raise ValueError(f"{name} {exc}") from None


@dataclass(frozen=True)
class Exponential:
    """Exponential backoff, with full jitter by default (the AWS "full jitter" scheme).

    The bound for failure ``n`` is ``min(cap, base * factor ** (n - 1))``; with ``jitter`` the
    delay is drawn uniformly from ``[0, bound]`` so that tasks failing together do not retry
    together, without it the delay is the bound.
    """

    base: float = 1.0
    factor: float = 2.0
    cap: float = 600.0
    jitter: bool = True

    def __post_init__(self) -> None:
        _non_negative("base", self.base)
        _non_negative("cap", self.cap)
        if _non_negative("factor", self.factor) < 1:
            raise ValueError(f"factor must be >= 1, got {self.factor!r}")
        if not isinstance(self.jitter, bool):
            raise TypeError("jitter must be True or False")

    def bound(self, attempt: int) -> float:
        """The largest delay after ``attempt`` failed attempts."""
        exponent = max(attempt, 1) - 1
        try:
            value = self.base * self.factor**exponent
        except OverflowError:
            return float(self.cap)
        return float(min(self.cap, value))

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Draw the delay (see the class docstring)."""
        bound = self.bound(attempt)
        if not self.jitter:
            return bound
        return (rng or random).uniform(0, bound)

    def longest(self) -> float:
        """The cap."""
        return float(self.cap)


@dataclass(frozen=True)
class Fixed:
    """The same delay before every retry."""

    seconds: float

    def __post_init__(self) -> None:
        _non_negative("seconds", self.seconds)

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Return ``seconds``."""
        return float(self.seconds)

    def longest(self) -> float:
        """Return ``seconds``."""
        return float(self.seconds)


@dataclass(frozen=True)
class Schedule:
    """An explicit list of delays: the n-th retry waits ``delays[n - 1]`` (the last one repeats)."""

    delays: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.delays:
            raise ValueError("an explicit schedule needs at least one delay")
        for index, value in enumerate(self.delays):
            _non_negative(f"delay [{index}]", value)

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Return the delay for ``attempt`` (the last one once the schedule is used up)."""
        index = min(max(attempt, 1), len(self.delays)) - 1
        return float(self.delays[index])

    def longest(self) -> float:
        """The largest delay of the schedule."""
        return float(max(self.delays))


Policy = Exponential | Fixed | Schedule


def parse(value: Any) -> Policy:
    """Normalize a ``backoff`` value: a policy object, seconds (fixed) or a sequence (schedule).

    Raises:
        TypeError, ValueError: The value is none of those, or out of range.
    """
    if isinstance(value, (Exponential, Fixed, Schedule)):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return Fixed(value)
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return Schedule(tuple(value))
    raise TypeError(
        "expected celery_guard.backoff.Exponential(...), Fixed(...), a number of seconds or a "
        f"sequence of delays, got {type(value).__name__}"
    )
