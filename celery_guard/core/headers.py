"""The one versioned message header that holds everything the guard stamps on a message.

Every feature keeps its fields under the single ``celery_guard`` header, named here so the
layout is documented in one place:

========================  ===================================================  ============
field                     meaning                                              written by
========================  ===================================================  ============
``v``                     layout version (:data:`VERSION`)                     every publish
``first_enqueued_at``     epoch seconds of the first publish of this job       every publish
``attempt``               Celery's retry count + 1                             every publish
``priority``              the priority level the router maps to a queue        routing
``idempotency``           ``{key, fingerprint, window, on_conflict}``          idempotency
``consumed``              attempts used (failure budget)                       failures
``throttled``             throttled retries so far                             failures
``history``               one entry per failed attempt                         failures
``delay``                 the delay of the retry that published this message   failures
``replay_of``             id of the dead letter this message replays           dlq
``tenant``                the tenant the job runs for                          (reserved)
``beat``                  ``{entry, slot, token, key}`` of a beat-fired run    beat
========================  ===================================================  ============

Version 1 messages (published before the beat fields moved in) carried the beat fields in two
headers of their own, ``celery_guard_beat`` and ``celery_guard_idempotency_key``; :func:`read`
still folds them in, so messages queued before an upgrade keep working.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

#: Name of the single message header that holds everything the guard stamps.
HEADER = "celery_guard"

#: Version of the header layout; a worker reads headers of this version or older.
VERSION = 2

#: Failure-budget fields: kept across the retries of one job, reset by a replay.
CONSUMED = "consumed"
THROTTLED = "throttled"
HISTORY = "history"
DELAY = "delay"
FAILURE_FIELDS = (CONSUMED, THROTTLED, HISTORY, DELAY)

#: Fields of one publish: a replay stamps them afresh.
PUBLISH_FIELDS = ("v", "first_enqueued_at", "attempt")

#: The beat's fields (a mapping: entry, slot, token, key).
BEAT = "beat"

#: Header names of version 1 that :func:`read` still understands.
LEGACY_BEAT_HEADER = "celery_guard_beat"
LEGACY_BEAT_KEY_HEADER = "celery_guard_idempotency_key"


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


def fresh(previous: Mapping[str, Any]) -> dict[str, Any]:
    """A first-publish header keeping ``previous``'s feature fields (what a replay sends)."""
    kept = {
        k: v for k, v in previous.items() if k not in FAILURE_FIELDS and k not in PUBLISH_FIELDS
    }
    return stamp(None, retries=0, **kept)


def read(headers: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """Return the guard header from a message's or request's headers (empty when absent).

    Version 1's separate beat headers are folded in under ``beat``.
    """
    if not headers:
        return {}
    value = headers.get(HEADER)
    guard: Mapping[str, Any] = value if isinstance(value, Mapping) else {}
    legacy = headers.get(LEGACY_BEAT_HEADER)
    if BEAT not in guard and isinstance(legacy, Mapping):
        beat = dict(legacy)
        key = headers.get(LEGACY_BEAT_KEY_HEADER)
        if isinstance(key, str):
            beat["key"] = key
        return {**guard, BEAT: beat}
    return guard
