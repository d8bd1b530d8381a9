"""Per-minute counts of the events in the database, for the dashboard and the SLO alerts.

Each process adds events to an in-memory buffer and writes it in one short transaction at
most every ``CELERY_GUARD_ROLLUP_FLUSH_SECONDS`` (after an outcome, and when a pool process
exits), so the hot path costs a dict update. A process killed with SIGKILL loses its last
buffer: rollups are for the dashboard and alerts; Prometheus counters are the exact ones.
"""

from __future__ import annotations

import bisect
import datetime as dt
import logging
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from django.db import IntegrityError, transaction

from celery_guard.conf import guard_settings
from celery_guard.observability.events import Event
from celery_guard.observability.models import LAG_BUCKETS, TaskMinute

logger = logging.getLogger(__name__)

#: Outcome events -> the counter they add to.
COUNTERS: Mapping[str, str] = {
    "succeeded": "succeeded",
    "retry_scheduled": "retried",
    "dead_lettered": "dead_lettered",
    "deduplicated": "deduplicated",
    "deferred": "deferred",
    "throttled": "deferred",
}
_FIELDS = ("started", "succeeded", "retried", "dead_lettered", "deduplicated", "deferred")


@dataclass
class _Counts:
    counts: dict[str, int] = field(default_factory=dict)
    lag_count: int = 0
    lag_sum: float = 0.0
    lag_max: float = 0.0
    lag_buckets: list[int] = field(default_factory=lambda: [0] * (len(LAG_BUCKETS) + 1))
    duration_sum: float = 0.0


_lock = threading.Lock()
_buffer: dict[tuple[dt.datetime, str, str], _Counts] = {}
#: When the buffer is next written (monotonic clock); ``None``: computed at the next outcome.
#: The flush interval is read once per flush, not once per outcome (a settings read costs
#: more than the count itself).
_next_flush: list[float | None] = [None]
#: The last minute computed (its start as a timestamp, and as a datetime): the hot path makes
#: one datetime per minute, not one per event.
_last_minute: list[tuple[float, dt.datetime]] = [(-1.0, dt.datetime.min)]


def _minute(now: float) -> dt.datetime:
    start = now - now % 60
    cached = _last_minute[0]
    if cached[0] == start:
        return cached[1]
    minute = dt.datetime.fromtimestamp(start, dt.timezone.utc)
    _last_minute[0] = (start, minute)
    return minute


def _flush_due() -> bool:
    now = time.monotonic()
    due = _next_flush[0]
    if due is None:
        due = _next_flush[0] = now + guard_settings.rollup_flush_seconds
    return now >= due


def add(
    task_name: str,
    queue: str,
    *,
    counter: str | None = None,
    lag: float | None = None,
    duration: float | None = None,
    now: float | None = None,
) -> None:
    """Add one event's counts to the buffer."""
    key = (_minute(time.time() if now is None else now), task_name, queue)
    with _lock:
        counts = _buffer.get(key)
        if counts is None:
            counts = _buffer[key] = _Counts()
        if counter is not None:
            counts.counts[counter] = counts.counts.get(counter, 0) + 1
        if lag is not None:
            counts.lag_count += 1
            counts.lag_sum += lag
            counts.lag_max = max(counts.lag_max, lag)
            counts.lag_buckets[bisect.bisect_left(LAG_BUCKETS, lag)] += 1
        if duration is not None:
            counts.duration_sum += duration


def record(event: Event, fields: Mapping[str, Any]) -> None:
    """Subscriber: count starts (with their lag) and outcomes; flush when due."""
    task, queue = str(fields.get("task_name") or ""), str(fields.get("queue") or "")
    if event.name == "started":
        add(task, queue, counter="started", lag=fields.get("lag"))
        return
    counter = COUNTERS.get(event.name)
    if counter is None:
        return
    add(task, queue, counter=counter, duration=fields.get("duration"))
    if _flush_due():
        flush()


def flush() -> int:
    """Write the buffered counts (one transaction); return the rows touched. Never raises."""
    with _lock:
        pending = dict(_buffer)
        _buffer.clear()
        _next_flush[0] = None
    if not pending:
        return 0
    try:
        _write(pending)
    except Exception:
        logger.warning("celery_guard: could not write %d rollup rows", len(pending), exc_info=True)
        with _lock:  # keep them for the next flush
            for key, counts in pending.items():
                _merge_buffer(key, counts)
        return 0
    return len(pending)


def _merge_buffer(key: tuple[dt.datetime, str, str], counts: _Counts) -> None:
    found = _buffer.get(key)
    if found is None:
        _buffer[key] = counts
        return
    _merge(found, counts)


def _merge(into: Any, counts: _Counts) -> None:
    if isinstance(into, _Counts):
        for name, value in counts.counts.items():
            into.counts[name] = into.counts.get(name, 0) + value
    else:
        for name, value in counts.counts.items():
            setattr(into, name, getattr(into, name) + value)
    into.lag_count += counts.lag_count
    into.lag_sum += counts.lag_sum
    into.lag_max = max(into.lag_max, counts.lag_max)
    buckets = list(into.lag_buckets or []) or [0] * (len(LAG_BUCKETS) + 1)
    into.lag_buckets = [a + b for a, b in zip(buckets, counts.lag_buckets, strict=False)]
    into.duration_sum += counts.duration_sum


def _write(pending: Mapping[tuple[dt.datetime, str, str], _Counts]) -> None:
    for (minute, task, queue), counts in sorted(pending.items()):
        with transaction.atomic():
            row = (
                TaskMinute.objects.select_for_update()
                .filter(minute=minute, task_name=task, queue=queue)
                .first()
            )
            if row is None:
                try:
                    with transaction.atomic():
                        row = TaskMinute(minute=minute, task_name=task, queue=queue)
                        _merge(row, counts)
                        row.save()
                    continue
                except IntegrityError:  # another process created it meanwhile
                    row = TaskMinute.objects.select_for_update().get(
                        minute=minute, task_name=task, queue=queue
                    )
            _merge(row, counts)
            row.save()


@dataclass
class Window:
    """Sums of the rollups of one task or queue over a time window."""

    started: int = 0
    succeeded: int = 0
    retried: int = 0
    dead_lettered: int = 0
    deduplicated: int = 0
    deferred: int = 0
    lag_count: int = 0
    lag_sum: float = 0.0
    lag_max: float = 0.0
    lag_buckets: list[int] = field(default_factory=lambda: [0] * (len(LAG_BUCKETS) + 1))

    def add(self, row: TaskMinute) -> None:
        """Add one minute's row."""
        for name in _FIELDS:
            setattr(self, name, getattr(self, name) + getattr(row, name))
        self.lag_count += row.lag_count
        self.lag_sum += row.lag_sum
        self.lag_max = max(self.lag_max, row.lag_max)
        buckets = list(row.lag_buckets or []) or [0] * (len(LAG_BUCKETS) + 1)
        self.lag_buckets = [a + b for a, b in zip(self.lag_buckets, buckets, strict=False)]

    def lag_p95(self) -> float | None:
        """The 95th percentile of the lag, as the upper bound of its bucket (max beyond)."""
        if not self.lag_count:
            return None
        wanted = 0.95 * self.lag_count
        seen = 0
        for bound, count in zip(LAG_BUCKETS, self.lag_buckets, strict=False):
            seen += count
            if seen >= wanted:
                return min(bound, self.lag_max)
        return self.lag_max

    def finished(self) -> int:
        """Deliveries that ended in success or a final failure."""
        return self.succeeded + self.dead_lettered

    def success_share(self) -> float | None:
        """Succeeded / (succeeded + dead-lettered), or ``None`` with neither."""
        done = self.finished()
        return self.succeeded / done if done else None

    def failure_share(self) -> float | None:
        """Share of finished deliveries that were dead-lettered, retries counted too."""
        tried = self.succeeded + self.dead_lettered + self.retried
        return (self.dead_lettered + self.retried) / tried if tried else None


def window(
    since: dt.datetime,
    until: dt.datetime | None = None,
    *,
    by: str = "queue",
    names: Iterable[str] | None = None,
) -> dict[str, Window]:
    """Sum the rollups from ``since`` (to ``until``) by ``"queue"`` or ``"task_name"``."""
    rows = TaskMinute.objects.filter(minute__gte=_minute(since.timestamp()))
    if until is not None:
        rows = rows.filter(minute__lt=until)
    if names is not None:
        rows = rows.filter(**{f"{by}__in": list(names)})
    found: dict[str, Window] = {}
    for row in rows.iterator():
        found.setdefault(getattr(row, by), Window()).add(row)
    return found


def per_minute(since: dt.datetime, *, by: str = "queue") -> dict[str, dict[dt.datetime, Window]]:
    """The rollups from ``since`` by ``by`` and minute (for the dashboard's charts)."""
    found: dict[str, dict[dt.datetime, Window]] = {}
    for row in TaskMinute.objects.filter(minute__gte=_minute(since.timestamp())).iterator():
        found.setdefault(getattr(row, by), {}).setdefault(row.minute, Window()).add(row)
    return found


def purge(before: dt.datetime) -> int:
    """Delete rollups older than ``before``; return how many."""
    deleted, _ = TaskMinute.objects.filter(minute__lt=before).delete()
    return int(deleted)
