"""The one versioned message header that holds everything the guard stamps on a message.

Every feature keeps its fields under the single ``celery_guard`` header, named here so the
layout is documented in one place:

========================  ===================================================  ============
field                     meaning                                              written by
========================  ===================================================  ============
``v``                     layout version (:data:`VERSION`)                     every publish
``first_enqueued_at``     epoch seconds of the first publish of this job       every publish
``attempt``               Celery's retry count + 1                             every publish
``sent_at``               epoch seconds of this publish (lag, oldest age)      every publish
``priority``              the priority level the router maps to a queue        routing
``idempotency``           ``{key, fingerprint, window, on_conflict}``          idempotency
``consumed``              attempts used (failure budget)                       failures
``throttled``             throttled retries so far                             failures
``history``               one entry per failed attempt                         failures
``delay``                 the delay of the retry that published this message   failures
``write_failures``        deliveries whose dead letter could not be written    failures
``replay_of``             id of the dead letter this message replays           dlq
``tenant``                the tenant the job runs for                          limits
``deferred``              deferrals by a limit or a pause (not attempts)       limits
``beat``                  ``{entry, slot, token, key}`` of a beat-fired run    beat
``request``               ``{id, initiator}``: the HTTP request that started   observability
                          the job (inherited by tasks its tasks enqueue)
``run``                   ``{run, item}`` of a bulk run's item; ``{run,        runs
                          complete, summary}`` on the run's completion task
========================  ===================================================  ============

Version 1 messages (published before the beat fields moved in) carried the beat fields in two
headers of their own, ``celery_guard_beat`` and ``celery_guard_idempotency_key``; :func:`read`
still folds them in, so messages queued before an upgrade keep working.
"""

from __future__ import annotations

import math
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
#: Deliveries whose dead letter could not be written (the record is retried later).
WRITE_FAILURES = "write_failures"
FAILURE_FIELDS = (CONSUMED, THROTTLED, HISTORY, DELAY, WRITE_FAILURES)

#: Fields of one publish: a replay stamps them afresh.
PUBLISH_FIELDS = ("v", "first_enqueued_at", "attempt", "sent_at")

#: The beat's fields (a mapping: entry, slot, token, key).
BEAT = "beat"

#: A bulk run's fields (a mapping: run, item; or run, complete, summary).
RUN = "run"

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
    now = time.time()
    if previous:
        first = previous.get("first_enqueued_at")
        header: dict[str, Any] = {
            **previous,
            "v": VERSION,
            "first_enqueued_at": first if first is not None else now,
            "attempt": retries + 1,
            "sent_at": now,
        }
    else:
        header = {"v": VERSION, "first_enqueued_at": now, "attempt": retries + 1, "sent_at": now}
    for name, value in fields.items():
        if value is not None:
            header[name] = value
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
    # Exact types and None first: read runs several times per delivery, and an ABC
    # isinstance check costs more than the rest of it.
    guard: Mapping[str, Any] = (
        value if type(value) is dict or (value is not None and isinstance(value, Mapping)) else {}
    )
    legacy = headers.get(LEGACY_BEAT_HEADER)
    if legacy is not None and BEAT not in guard and isinstance(legacy, Mapping):
        beat = dict(legacy)
        key = headers.get(LEGACY_BEAT_KEY_HEADER)
        if isinstance(key, str):
            beat["key"] = key
        return {**guard, BEAT: beat}
    return guard


#: Largest count (attempt, consumed...) a header may carry: what a PositiveIntegerField holds.
MAX_COUNT = 2**31 - 1
#: Latest first-enqueue time a header may carry (the last second of year 9999, UTC).
MAX_TIMESTAMP = 253402300799.0
#: Longest idempotency key (the ledger's key column; derived keys never exceed it).
MAX_KEY = 200
#: Longest idempotency window a header may carry (100 years).
MAX_WINDOW = 100 * 365.25 * 86400
#: Longest text a header field may carry where a 255-character column stores it.
MAX_TEXT = 255

_COUNTS = ("attempt", CONSUMED, THROTTLED, WRITE_FAILURES, "deferred")


def _finite(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _count_ok(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and 0 <= value <= MAX_COUNT


def _storable(value: Any, depth: int = 0) -> bool:
    """Whether :func:`_unstorable` would find nothing in ``value`` (the common case, fast).

    Decides on exact built-in types only and builds no paths; any other type answers False,
    so :func:`_unstorable` then looks again and words what it finds. Strings and integers,
    most of a header, are decided inline: this runs on every delivery.
    """
    if depth > 20:
        return False
    kind = type(value)
    if kind is str:
        return "\x00" not in value
    if kind is int or kind is bool or value is None:
        return True
    if kind is float:
        return math.isfinite(value)
    depth += 1
    if kind is dict:
        if depth > 20 and value:
            return False  # its items are nested too deeply
        for key, item in value.items():
            if (type(key) is not str or "\x00" in key) and not _storable(key, depth):
                return False
            kind = type(item)
            if kind is int:
                continue
            if kind is str:
                if "\x00" in item:
                    return False
            elif not _storable(item, depth):
                return False
        return True
    if kind is list or kind is tuple:
        return all(_storable(item, depth) for item in value)
    return False


def _unstorable(value: Any, path: str, found: list[str], depth: int = 0) -> None:
    """Collect NUL characters and non-finite numbers, which no database column can hold."""
    if depth > 20:
        found.append(f"{path}: nested too deeply")
    elif isinstance(value, str):
        if "\x00" in value:
            found.append(f"{path}: contains a NUL character")
    elif isinstance(value, float):
        if not math.isfinite(value):
            found.append(f"{path}: {value!r} is not a finite number")
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _unstorable(key, f"{path} key", found, depth + 1)
            _unstorable(item, f"{path}.{key}", found, depth + 1)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _unstorable(item, f"{path}[{index}]", found, depth + 1)


def problems(guard: Mapping[str, Any]) -> list[str]:
    """What is wrong with a guard header the worker received (empty when nothing is).

    Every value the worker reads is checked against what the guard itself writes and what the
    dead-letter row can store, so a forged or corrupt header is refused with a reason instead
    of breaking (or looping in) the failure pipeline.
    """
    if _well_formed(guard):
        return []
    # Rare (corrupt, forged, or not a plain dict): look again, naming each problem.
    return _problems(guard)


def _problems(guard: Mapping[str, Any]) -> list[str]:
    """The full check of :func:`problems`: every problem, each with its wording."""
    found: list[str] = []
    _unstorable(dict(guard), HEADER, found)
    for name in _COUNTS:
        if name in guard and not _count_ok(guard[name]):
            found.append(f"{HEADER}.{name}: {guard[name]!r} is not a count in 0..{MAX_COUNT}")
    first = guard.get("first_enqueued_at")
    if first is not None and not (_finite(first) and 0 <= first <= MAX_TIMESTAMP):
        found.append(f"{HEADER}.first_enqueued_at: {first!r} is not a Unix time")
    delay = guard.get("delay")
    if delay is not None and not (_finite(delay) and delay >= 0):
        found.append(f"{HEADER}.delay: {delay!r} is not a delay in seconds")
    if "history" in guard and not isinstance(guard["history"], list):
        found.append(f"{HEADER}.history: not a list")
    for name in ("tenant", "priority"):
        value = guard.get(name)
        if value is not None and not (isinstance(value, str) and len(value) <= MAX_TEXT):
            found.append(f"{HEADER}.{name}: not a string of at most {MAX_TEXT} characters")
    replay_of = guard.get("replay_of")
    if replay_of is not None and not (
        not isinstance(replay_of, bool) and isinstance(replay_of, int) and 1 <= replay_of < 2**63
    ):
        found.append(f"{HEADER}.replay_of: {replay_of!r} is not a dead-letter id")
    entry = guard.get("idempotency")
    if entry is not None:
        found.extend(_identity_problems(entry))
    return found


def _well_formed(guard: Mapping[str, Any]) -> bool:
    """True only when :func:`problems` would find nothing: a header as the guard writes it.

    Accepts exact built-in types in range and answers False on anything else, so the full
    check (which words each problem) only runs for a header this fast check cannot vouch for.
    """
    if type(guard) is not dict or not _storable(guard):
        return False  # past here every float in the header is finite
    get = guard.get
    for name in _COUNTS:
        count = get(name, 0)
        if type(count) is not int or not 0 <= count <= MAX_COUNT:
            return False
    first = get("first_enqueued_at")
    if first is not None and not (type(first) in (int, float) and 0 <= first <= MAX_TIMESTAMP):
        return False
    delay = get("delay")
    if delay is not None and not (type(delay) in (int, float) and delay >= 0):
        return False
    if HISTORY in guard and type(guard[HISTORY]) is not list:
        return False
    for name in ("tenant", "priority"):
        text = get(name)
        if text is not None and not (type(text) is str and len(text) <= MAX_TEXT):
            return False
    replay_of = get("replay_of")
    if replay_of is not None and not (type(replay_of) is int and 1 <= replay_of < 2**63):
        return False
    entry = get("idempotency")
    return entry is None or not _identity_problems(entry)


def _identity_problems(entry: Any) -> list[str]:
    where = f"{HEADER}.idempotency"
    if not isinstance(entry, Mapping):
        return [f"{where}: not a mapping"]
    found = []
    key = entry.get("key")
    if not (isinstance(key, str) and 0 < len(key) <= MAX_KEY):
        found.append(f"{where}.key: not a string of 1..{MAX_KEY} characters")
    fingerprint = entry.get("fingerprint", "")
    if not (isinstance(fingerprint, str) and len(fingerprint) <= 64):
        found.append(f"{where}.fingerprint: not a string of at most 64 characters")
    window = entry.get("window")
    if window is not None and not (_finite(window) and 0 < window <= MAX_WINDOW):
        found.append(f"{where}.window: {window!r} is not a window of 0..{MAX_WINDOW:g} seconds")
    if entry.get("on_conflict", "raise") not in ("raise", "ignore"):
        found.append(f"{where}.on_conflict: not 'raise' or 'ignore'")
    return found
