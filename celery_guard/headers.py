"""The namespaced message header that guarded tasks carry (enqueue time, attempt, version)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

#: Name of the single message header that holds everything the guard stamps.
HEADER = "celery_guard"

#: Version of the header layout; a worker reads headers of this version or older.
VERSION = 1


def stamp(previous: Mapping[str, Any] | None, *, retries: int, **fields: Any) -> dict[str, Any]:
    """Build the guard header for a publish.

    A first publish gets the current time as its first-enqueue time; a republish of the same
    task (a Celery retry carries the request's headers along) keeps the original time, so
    deadlines and lag are measured from the first enqueue, and keeps the other fields of the
    previous header (attempt history...) unless ``fields`` replaces them.

    Args:
        previous: The guard header the task already carried, if any.
        retries: Celery's retry count for this publish (0 for a first publish).
        **fields: Feature fields to record (``priority``...); ``None`` values are left out.
    """
    first = previous.get("first_enqueued_at") if previous else None
    header: dict[str, Any] = {
        **(previous or {}),
        "v": VERSION,
        "first_enqueued_at": first if first is not None else time.time(),
        "attempt": retries + 1,
    }
    header.update({k: v for k, v in fields.items() if v is not None})
    return header


def read(headers: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """Return the guard header from a message's or request's headers (empty when absent)."""
    if not headers:
        return {}
    value = headers.get(HEADER)
    return value if isinstance(value, Mapping) else {}
