"""The one validator of durations (settings, options, command arguments): finite and bounded."""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any

DAY = 86400.0
#: Longest duration any setting or option accepts, in seconds, unless it says otherwise. Far
#: past any sane value, and far below what overflows a ``datetime`` (year 9999) or a Redis TTL.
MAX_SECONDS = 366 * DAY
#: Longest beat lease: a leader that dies holds the schedule this long.
MAX_BEAT_LEASE = DAY
#: Bounds of the dead-letter retention (days). Under a day, a purge deletes rows replayed a
#: moment ago, their replay history with them.
MIN_RETENTION_DAYS = 1.0
MAX_RETENTION_DAYS = 3660.0


def _text(value: float) -> str:
    return f"{value:.15g}"


def _amount(value: float, unit: str) -> str:
    return f"{_text(value)} {unit[:-1] if value == 1 else unit}"


def seconds(
    value: Any,
    *,
    maximum: float = MAX_SECONDS,
    minimum: float = 0.0,
    allow_minimum: bool = False,
    unit: str = "seconds",
) -> float:
    """Return ``value`` (a number of ``unit``, or a ``timedelta`` when ``unit`` is seconds).

    Args:
        value: The duration as given.
        maximum: Largest accepted value, in ``unit``.
        minimum: Smallest value; excluded unless ``allow_minimum``.
        allow_minimum: Whether ``minimum`` itself is accepted (``0`` for "no delay").
        unit: ``"seconds"`` or ``"days"``, for the messages.

    Raises:
        TypeError: Not a number (``bool`` is not one), nor a ``timedelta`` for seconds.
        ValueError: NaN, infinite, out of ``(minimum, maximum]``. The message does not name
            the setting or option: callers prefix it.
    """
    if isinstance(value, timedelta) and unit == "seconds":
        number = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    else:
        kinds = "a timedelta or seconds (int/float)" if unit == "seconds" else f"{unit} (number)"
        raise TypeError(f"expected {kinds}, got {type(value).__name__}")
    if not math.isfinite(number):
        raise ValueError(f"must be a finite number of {unit}, got {value!r}")
    if allow_minimum and number < minimum:
        raise ValueError(f"must be at least {_amount(minimum, unit)}, got {value!r}")
    if not allow_minimum and number <= minimum:
        above = "a positive number of" if minimum == 0 else f"more than {_text(minimum)}"
        raise ValueError(f"must be {above} {unit}, got {value!r}")
    if number > maximum:
        days = f" ({_text(maximum / DAY)} days)" if unit == "seconds" and maximum >= DAY else ""
        raise ValueError(f"must be at most {_text(maximum)} {unit}{days}, got {value!r}")
    return number
