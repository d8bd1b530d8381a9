"""Schedule slots of beat entries: due times in UTC, catch-up plans and per-entry policies.

A *slot* is the due time of one run of an entry, derived only from the entry's schedule and
its ``last_run_at`` as stored in the database, so every beat process computes the same slot
for the same run. Pure functions: no database, no Celery app state beyond the schedule.
"""

from __future__ import annotations

import collections
import copy
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from celery import schedules

from celery_guard import durations

UTC = timezone.utc

CATCHUP_LATEST = "latest"
CATCHUP_SKIP = "skip"
CATCHUP_POLICIES = (CATCHUP_LATEST, CATCHUP_SKIP)
OVERLAP_ALLOW = "allow"
OVERLAP_SKIP = "skip"
OVERLAP_POLICIES = (OVERLAP_ALLOW, OVERLAP_SKIP)

#: Sentry's monitor slugs: at most 50 of these characters.
MONITOR_SLUG_LENGTH = 50
MONITOR_SLUG = re.compile(r"[a-z0-9_-]{1,50}")
#: Most missed slots recorded for one catch-up (the most recent ones); older ones are only
#: counted in the log. Recording is history: the fire guarantee does not depend on it.
MISSED_RECORD_LIMIT = 100
#: Most slots walked one by one for schedules without fixed spacing (crontab, solar).
WALK_LIMIT = 10_000
#: Windows probed backwards from now to find the latest due slot after a long downtime.
PROBE_WINDOWS = tuple(
    timedelta(**kw)
    for kw in ({"minutes": 1}, {"hours": 1}, {"days": 1}, {"days": 32}, {"days": 367})
)


@dataclass(frozen=True)
class EntryPolicy:
    """Catch-up and overlap policy of one beat entry.

    Attributes:
        catchup: After downtime, when no due slot is on time (late by at most the
            scheduler's grace): ``latest`` fires the most recent due slot, recording older
            ones as missed; ``skip`` records them all as missed and waits for the next slot.
        overlap: ``allow`` fires regardless of earlier runs; ``skip`` records a slot as
            skipped while the previous run of the same entry has not finished.
        overlap_timeout: Seconds after which an unfinished previous run (e.g. its worker
            was killed) stops blocking new slots under ``overlap = skip``.
        sentry_monitor: Whether the worker sends Sentry cron check-ins for the entry's runs
            (when sentry-sdk is installed and initialised): ``True`` uses the entry's name as
            the monitor slug (slugified), a string is the slug itself.
    """

    catchup: str = CATCHUP_LATEST
    overlap: str = OVERLAP_ALLOW
    overlap_timeout: float = 3600.0
    sentry_monitor: bool | str = False


def parse_policy(value: Any) -> EntryPolicy:
    """Validate one ``CELERY_GUARD_BEAT_POLICIES`` value.

    Raises:
        TypeError, ValueError: The value is not a dict of known keys with valid values.
    """
    if not isinstance(value, Mapping):
        raise TypeError(f"must be a dict, got {type(value).__name__}")
    unknown = set(value) - {"catchup", "overlap", "overlap_timeout", "sentry_monitor"}
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(sorted(map(repr, unknown)))}")
    policy = EntryPolicy(**value)
    if policy.catchup not in CATCHUP_POLICIES:
        raise ValueError(f"catchup must be one of {CATCHUP_POLICIES}, got {policy.catchup!r}")
    if policy.overlap not in OVERLAP_POLICIES:
        raise ValueError(f"overlap must be one of {OVERLAP_POLICIES}, got {policy.overlap!r}")
    timeout = policy.overlap_timeout
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise ValueError(f"overlap_timeout must be a positive number, got {timeout!r}")
    try:
        durations.seconds(timeout)
    except ValueError as exc:
        raise ValueError(f"overlap_timeout {exc}") from None
    monitor = policy.sentry_monitor
    if not isinstance(monitor, (bool, str)) or (
        isinstance(monitor, str) and not MONITOR_SLUG.fullmatch(monitor)
    ):
        raise ValueError(
            "sentry_monitor must be True, False or a Sentry monitor slug (lowercase letters, "
            f"digits, '-' and '_', at most {MONITOR_SLUG_LENGTH} characters), got {monitor!r}"
        )
    return policy


def monitor_slug(name: str, policy: EntryPolicy) -> str | None:
    """The Sentry monitor slug of entry ``name`` under ``policy`` (``None``: no check-ins)."""
    if policy.sentry_monitor is True:
        slug = re.sub(r"[^a-z0-9_-]+", "-", name.lower()).strip("-_")
        return slug[:MONITOR_SLUG_LENGTH].rstrip("-_") or "celery-guard-beat"
    if isinstance(policy.sentry_monitor, str):
        return policy.sentry_monitor
    return None


def policy_for(name: str, policies: Mapping[str, Any]) -> EntryPolicy:
    """Return the policy of entry ``name``: its own, else the ``"*"`` default, else built-in."""
    value = policies.get(name, policies.get("*"))
    return EntryPolicy() if value is None else parse_policy(value)


def to_utc(value: datetime) -> datetime:
    """Return ``value`` as an aware UTC datetime (a naive one is taken to be UTC)."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def _fixed_step(schedule: Any) -> timedelta | None:
    # A plain, non-relative interval: slots are evenly spaced and can be counted, not walked.
    if type(schedule) is schedules.schedule and not schedule.relative:
        step = schedule.run_every
        return step if step > timedelta(0) else None
    return None


def _in_schedule_zone(schedule: Any, after: datetime) -> datetime:
    # Before 5.7 Celery matched a crontab's hours against the time zone of the datetime it was
    # given, not the schedule's: hand it the last run in the schedule's own zone (the row's
    # time zone for django-celery-beat, else the app's CELERY_TIMEZONE). Interval schedules
    # stay in UTC, where adding the interval cannot cross a DST change.
    if isinstance(schedule, schedules.crontab):
        return to_utc(after).astimezone(schedule.tz)
    return to_utc(after)


def next_slot(schedule: Any, after: datetime) -> datetime:
    """Return the first due time of ``schedule`` after ``after``, in UTC.

    Uses the schedule's own ``remaining_estimate`` (so crontab time zones and DST behave as
    in Celery and django-celery-beat), evaluated with "now" frozen at ``after``, which makes
    the result a function of ``after`` alone (not of the clock, nor of the Celery version:
    5.5 and 5.6 look at "now" to decide whether the rest of the hour is still ahead).
    Crontabs are evaluated in their own time zone. Intervals of whole seconds give
    whole-second slots.
    """
    start = _in_schedule_zone(schedule, after)
    frozen = copy.copy(schedule)
    frozen.nowfun = lambda: start
    slot: datetime = to_utc(start) + frozen.remaining_estimate(start)
    step = _fixed_step(schedule)
    if step is not None and step >= timedelta(seconds=1) and not step.microseconds:
        slot = slot.replace(microsecond=0)
    return slot


@dataclass(frozen=True)
class Plan:
    """What to do about an entry that is due.

    Attributes:
        slot: The slot this dispatch is for.
        fire: Publish it (subject to the overlap policy) or only record it as missed.
        missed: Older due slots to record as missed (at most ``MISSED_RECORD_LIMIT``).
        missed_total: How many older due slots there were in all.
        following: The slot after ``slot``: when the entry is due next.
    """

    slot: datetime
    fire: bool
    missed: tuple[datetime, ...]
    missed_total: int
    following: datetime


def _walk(
    schedule: Any, first: datetime, now: datetime, cutoff: datetime
) -> tuple[datetime, list[datetime], int]:
    """Return the earliest on-time due slot (else the latest due one), older ones, their count."""
    recent: collections.deque[datetime] = collections.deque(maxlen=MISSED_RECORD_LIMIT)
    slot, count = first, 0
    while count < WALK_LIMIT:
        if slot >= cutoff:
            return slot, list(recent), count
        following = next_slot(schedule, slot)
        if following > now or following <= slot:
            return slot, list(recent), count
        recent.append(slot)
        slot, count = following, count + 1
    # A long downtime of a dense schedule: jump instead of walking every slot since the
    # last run. First an on-time slot, else the latest due one from a window before now.
    on_time = next_slot(schedule, cutoff - timedelta(microseconds=1))
    if on_time <= now:
        return on_time, list(recent), count + 1
    for window in PROBE_WINDOWS:
        probe = next_slot(schedule, max(slot, now - window))
        if probe <= now:
            while (following := next_slot(schedule, probe)) <= now and following > probe:
                probe = following
            return probe, list(recent), count + 1
    return slot, list(recent), count  # pragma: no cover - nothing due in a year


def plan(
    schedule: Any,
    last_run_at: datetime,
    now: datetime,
    *,
    policy: EntryPolicy,
    grace: float,
) -> Plan | None:
    """Plan the dispatch of an entry last run at ``last_run_at``; ``None`` when nothing is due.

    A due slot late by at most ``grace`` seconds is *on time* and fires, one slot per call,
    oldest first (a beat that stalls briefly loses nothing). Older due slots are downtime: if
    an on-time slot exists they are recorded missed; if none does, ``catchup = latest`` fires
    the most recent due slot and ``skip`` records it missed as well.

    Args:
        schedule: The entry's Celery schedule.
        last_run_at: The slot the entry last ran for (as stored in the database).
        now: The current time.
        policy: The entry's catch-up policy.
        grace: Seconds a slot may be late and still be on time.
    """
    now = to_utc(now)
    first = next_slot(schedule, last_run_at)
    if first > now:
        return None
    cutoff = now - timedelta(seconds=grace)
    step = _fixed_step(schedule)
    if step is not None:
        behind = (now - first) // step
        if first + behind * step >= cutoff:  # some due slot is on time: the earliest of them
            behind = -((first - cutoff) // step) if first < cutoff else 0
        slot = first + behind * step
        missed = [slot - k * step for k in range(min(behind, MISSED_RECORD_LIMIT), 0, -1)]
        following = slot + step
    else:
        slot, missed, behind = _walk(schedule, first, now, cutoff)
        following = next_slot(schedule, slot)
    return Plan(
        slot=slot,
        fire=slot >= cutoff or policy.catchup == CATCHUP_LATEST,
        missed=tuple(missed),
        missed_total=behind,
        following=following,
    )


def slot_key(entry: str, slot: datetime) -> str:
    """Return the idempotency key of one slot: ``beat:<entry>:<slot in ISO 8601 UTC>``."""
    return f"beat:{entry}:{format_slot(slot)}"


def format_slot(slot: datetime) -> str:
    """Format a slot as ISO 8601 UTC with a ``Z`` (microseconds only when present)."""
    return to_utc(slot).isoformat().replace("+00:00", "Z")
