"""What an HTTP error carries: its status and its ``Retry-After`` (seconds, date, datetime).

Read by the failure pipeline (a 429 with ``Retry-After`` is a throttled retry) and by the
limits (the same answer slows the named limit the task uses, for the whole cluster).
"""

from __future__ import annotations

import datetime as dt
import email.utils
import math
from typing import Any


def _response_of(exc: BaseException) -> Any:
    try:
        # httpx raises RuntimeError from some properties when the attribute is unset.
        return getattr(exc, "response", None)
    except Exception:
        return None


def http_status(exc: BaseException) -> int | None:
    """The HTTP status of the response an exception carries (``requests``, ``httpx``...)."""
    status = getattr(_response_of(exc), "status_code", None)
    return status if isinstance(status, int) and not isinstance(status, bool) else None


def parse_retry_after(value: Any, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (seconds, HTTP date, datetime), or None."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return max(float(value), 0.0) if math.isfinite(value) else None
    if isinstance(value, dt.timedelta):
        return max(value.total_seconds(), 0.0)
    if isinstance(value, dt.datetime):
        when = value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)
        return max(when.timestamp() - now, 0.0)
    if isinstance(value, (str, bytes)):
        text = value.decode() if isinstance(value, bytes) else value
        text = text.strip()
        try:
            return parse_retry_after(float(text), now)
        except ValueError:
            pass
        try:
            return parse_retry_after(email.utils.parsedate_to_datetime(text), now)
        except (TypeError, ValueError, IndexError):
            return None
    return None


def retry_after_of(exc: BaseException, now: float) -> float | None:
    """The ``Retry-After`` an exception carries, on itself or on its HTTP response."""
    seconds = parse_retry_after(getattr(exc, "retry_after", None), now)
    if seconds is not None:
        return seconds
    response_headers = getattr(_response_of(exc), "headers", None)
    if response_headers is None:
        return None
    try:
        header = response_headers.get("Retry-After")
    except Exception:
        return None
    return parse_retry_after(header, now)


__all__ = ["http_status", "parse_retry_after", "retry_after_of"]
