"""The one catalogue of guard events, and ``emit``: what every subscriber receives.

The guard calls :func:`emit` at each decision point (a run starts, succeeds, is retried,
dead-lettered, deduplicated...). Logs, Prometheus metrics, Sentry and the database rollups of
the dashboard and the SLO alerts are subscribers (:func:`subscribe`); none of them is called
when nobody listens, and ``emit`` then costs one attribute read.

Fields common to events of a running task are added from the run context
(:mod:`celery_guard.observability.context`): ``task_id``, ``task_name``, ``queue``,
``attempt``, ``tenant``, ``request_id``, ``initiator``. An event's own fields are listed in
:data:`CATALOGUE`; docs/observability.md renders the same table. Field values are plain
data, never task arguments or messages (they end in logs and metric labels): idempotency keys
appear only hashed (:func:`key_hash`).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from celery_guard.observability import context

logger = logging.getLogger(__name__)

#: A subscriber: called with the event and its fields (context fields included).
Subscriber = Callable[["Event", Mapping[str, Any]], None]

#: Fields every event of a running task carries, from the run context.
CONTEXT_FIELDS = context.FIELDS


@dataclass(frozen=True)
class Event:
    """One kind of event: its name, log level, fields and meaning.

    Attributes:
        name: Stable name (a contract: dashboards and alert rules use it).
        level: Level of its log record.
        fields: Its own fields (besides :data:`CONTEXT_FIELDS`).
        doc: What happened.
        outcome: Whether it ends a delivery (exactly one outcome event per delivery).
    """

    name: str
    level: int
    fields: tuple[str, ...]
    doc: str
    outcome: bool = False


_INFO, _WARNING, _ERROR = logging.INFO, logging.WARNING, logging.ERROR

#: Every event the guard emits, by name.
CATALOGUE: Mapping[str, Event] = {
    e.name: e
    for e in (
        Event(
            "enqueued",
            _INFO,
            ("priority", "idempotency_key_hash"),
            "A guarded task was published (producer side).",
        ),
        Event(
            "deduplicated",
            _INFO,
            ("where", "idempotency_key_hash", "held_by", "state"),
            "A call was not published (where=enqueue) or its body not run (where=run): its "
            "idempotency key is held or already succeeded.",
            outcome=True,
        ),
        Event(
            "key_busy",
            _INFO,
            ("idempotency_key_hash", "held_by", "retry_in"),
            "The idempotency key runs in another task; this delivery is republished for later.",
            outcome=True,
        ),
        Event(
            "started",
            _INFO,
            ("lag",),
            "A delivery passed every gate (idempotency, limits) and its body starts; lag = "
            "seconds since it was published (or since its ETA).",
        ),
        Event(
            "succeeded",
            _INFO,
            ("duration",),
            "The body returned.",
            outcome=True,
        ),
        Event(
            "retry_scheduled",
            _WARNING,
            ("error_class", "kind", "delay", "attempts_used", "duration"),
            "The body failed and a retry was published (kind: transient, throttled...).",
            outcome=True,
        ),
        Event(
            "throttled",
            _WARNING,
            ("limit", "delay"),
            "A limit pushed the delivery back without counting an attempt (limits feature).",
            outcome=True,
        ),
        Event(
            "deferred",
            _INFO,
            ("limit", "delay"),
            "A limit deferred the delivery to a later time (limits feature).",
            outcome=True,
        ),
        Event(
            "dead_lettered",
            _ERROR,
            ("reason", "error_class", "attempts_used", "dead_letter_id", "duration"),
            "The delivery failed for good and was recorded as a dead letter.",
            outcome=True,
        ),
        Event(
            "requeued",
            _ERROR,
            ("why",),
            "The message was left on the broker for redelivery (a retry or a dead letter "
            "could not be written).",
            outcome=True,
        ),
        Event(
            "worker_lost",
            _WARNING,
            ("lost",),
            "A redelivery of a message whose worker process died while running it.",
        ),
        Event(
            "replayed",
            _INFO,
            ("dead_letter_id", "new_task_id", "edited", "by"),
            "A dead letter was published again.",
        ),
        Event(
            "lease_acquired",
            _INFO,
            ("lock", "holder", "token"),
            "This beat became the leader of its lock.",
        ),
        Event(
            "lease_lost",
            _WARNING,
            ("lock", "holder", "why"),
            "This beat stopped being the leader.",
        ),
        Event(
            "slot_fired",
            _INFO,
            ("entry", "slot", "missed"),
            "The leader beat published one slot of a periodic entry (missed: slots skipped).",
        ),
        Event(
            "run_progress",
            _INFO,
            ("run_id", "done", "total", "failed"),
            "A bulk run made progress (bulk runs feature).",
        ),
        Event(
            "alert_raised",
            _ERROR,
            ("slo", "objective", "value", "threshold", "alert_id"),
            "An SLO breach held for its window: an alert was raised.",
        ),
        Event(
            "alert_resolved",
            _INFO,
            ("slo", "objective", "value", "threshold", "alert_id"),
            "A raised alert's SLO recovered.",
        ),
    )
}


class UnknownEvent(KeyError):
    """``emit`` was called with a name that is not in :data:`CATALOGUE`."""


class _Bus:
    # One attribute holding a tuple: emit reads it once, subscribe swaps it atomically.
    subscribers: tuple[tuple[str, Subscriber], ...] = ()


_bus = _Bus()


def subscribe(subscriber: Subscriber, *, uid: str) -> None:
    """Call ``subscriber`` for every event; a second call with the same ``uid`` replaces it."""
    _bus.subscribers = (
        *((u, s) for u, s in _bus.subscribers if u != uid),
        (uid, subscriber),
    )


def unsubscribe(uid: str) -> None:
    """Stop calling the subscriber registered under ``uid``."""
    _bus.subscribers = tuple((u, s) for u, s in _bus.subscribers if u != uid)


def listening() -> bool:
    """Whether any subscriber is registered."""
    return bool(_bus.subscribers)


def emit(name: str, **fields: Any) -> None:
    """Send event ``name`` with ``fields`` to every subscriber (never raises for them).

    Context fields (task id, request id...) are added unless given. A subscriber that raises
    is logged and the others still run: observability never breaks the guarded work.

    Raises:
        UnknownEvent: ``name`` is not in the catalogue (a programming error).
    """
    subscribers = _bus.subscribers
    if not subscribers:
        return
    event = CATALOGUE.get(name)
    if event is None:
        raise UnknownEvent(name)
    current = context.current()
    if current is not None:
        own = fields.get("task_id", current.task_id) == current.task_id
        if not own:
            fields = {**current.origin_fields(), **fields}
        elif event.outcome:
            current.outcome = name
            fields = {**current.shared_fields(), "duration": current.elapsed(), **fields}
        else:
            fields = {**current.shared_fields(), **fields}
    else:
        found = context.origin()
        if found is not None:
            fields = {"request_id": found.request_id, "initiator": found.who(), **fields}
    for uid, subscriber in subscribers:
        try:
            subscriber(event, fields)
        except Exception:
            logger.exception("celery_guard: event subscriber %s failed on %s", uid, name)


def key_hash(key: str | None) -> str | None:
    """A short, stable hash of an idempotency key: logs tie runs together without the key."""
    if not key:
        return None
    return hashlib.sha256(key.encode()).hexdigest()[:16]
