"""Operator services over the dead-letter table: select, discard, purge, counts."""

from __future__ import annotations

import datetime as dt
import logging
import re
from typing import Any

from django.db import transaction
from django.db.models import Count, QuerySet
from django.utils import timezone
from django.utils.dateparse import parse_date, parse_datetime

from celery_guard.conf import guard_settings
from celery_guard.core import audit
from celery_guard.dlq.models import OPEN_STATUSES, DeadLetter, Status
from celery_guard.observability import providers

logger = logging.getLogger(__name__)

_AGO = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")


def parse_when(text: str, *, now: dt.datetime | None = None) -> dt.datetime:
    """A point in time: ISO date or datetime (UTC when naive), or an age like ``30m``, ``2d``.

    Raises:
        ValueError: ``text`` is none of those.
    """
    now = now or timezone.now()
    match = _AGO.match(text.strip())
    if match:
        seconds = float(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
        try:
            return now - dt.timedelta(seconds=seconds)
        except OverflowError:
            # 99999999999d: before year 1, or past what a timedelta holds.
            raise ValueError(f"age {text!r} reaches before year 1") from None
    when = parse_datetime(text)
    if when is None:
        day = parse_date(text)
        if day is None:
            raise ValueError(f"expected an ISO date/datetime or an age like 2h or 7d, got {text!r}")
        when = dt.datetime.combine(day, dt.time())
    if timezone.is_naive(when):
        when = timezone.make_aware(when, dt.timezone.utc)
    return when


def select(
    *,
    task: str | None = None,
    reason: str | None = None,
    exception: str | None = None,
    queue: str | None = None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    statuses: tuple[str, ...] = OPEN_STATUSES,
) -> QuerySet[DeadLetter]:
    """Replayable dead letters matching exact filters, oldest failure first (replay order)."""
    rows = DeadLetter.objects.filter(status__in=statuses)
    exact = {"task_name": task, "reason": reason, "exception_class": exception, "queue": queue}
    rows = rows.filter(**{name: value for name, value in exact.items() if value})
    if since is not None:
        rows = rows.filter(failed_at__gte=since)
    if until is not None:
        rows = rows.filter(failed_at__lt=until)
    ordered: QuerySet[DeadLetter] = rows.order_by("failed_at", "id")
    return ordered


#: Dead letters discarded per transaction.
DISCARD_BATCH = 1000


def discard(rows: QuerySet[DeadLetter], reason: str, *, user: Any = None) -> int:
    """Discard ``rows`` (those not discarded yet) with ``reason``; return how many.

    In batches of :data:`DISCARD_BATCH` rows by id, one transaction each: the rows are locked
    (``SKIP LOCKED``: a row that a replay is publishing right now is left to it), set to
    ``discarded`` with the reason, and audited in the admin log under ``user``.

    Raises:
        ValueError: ``reason`` is blank.
    """
    reason = reason.strip()
    if not reason:
        raise ValueError("a reason is required")
    pending = rows.exclude(status=DeadLetter.Status.DISCARDED).order_by("pk")
    done, after = 0, 0
    while True:
        ids = list(pending.filter(pk__gt=after).values_list("pk", flat=True)[:DISCARD_BATCH])
        if not ids:
            return done
        after = ids[-1]
        with transaction.atomic():
            locked = list(
                DeadLetter.objects.select_for_update(skip_locked=True)
                .filter(pk__in=ids)
                .exclude(status=DeadLetter.Status.DISCARDED)
                .only("pk", "task_name", "task_id", "reason", "status")
                .order_by("pk")
            )
            DeadLetter.objects.filter(pk__in=[row.pk for row in locked]).set_status(
                Status.DISCARDED, reason
            )
            audit.log_changes(
                user, [(row, f"Discarded (was {row.status}): {reason}") for row in locked]
            )
        for row in locked:
            logger.info(
                "celery_guard: dead letter %s discarded by %s (was %s): %s",
                row.pk,
                user.get_username() if user is not None else "?",
                row.status,
                reason,
            )
        done += len(locked)


def purge(days: float | None = None, *, now: dt.datetime | None = None) -> int:
    """Delete replayed and discarded dead letters that failed more than ``days`` ago.

    ``days`` defaults to ``CELERY_GUARD_DLQ_RETENTION_DAYS``. Dead and unroutable rows are
    kept whatever their age: they still need an operator. Returns the rows deleted.
    """
    days = guard_settings.dlq_retention_days if days is None else days
    cutoff = (now or timezone.now()) - dt.timedelta(days=days)
    old = DeadLetter.objects.filter(
        status__in=(DeadLetter.Status.REPLAYED, DeadLetter.Status.DISCARDED),
        failed_at__lt=cutoff,
    )
    deleted = 0
    # In batches: one huge DELETE would hold locks and bloat the transaction.
    while True:
        ids = list(old.values_list("pk", flat=True)[:5000])
        if not ids:
            break
        DeadLetter.objects.filter(pk__in=ids).delete()
        deleted += len(ids)
    logger.info(
        "celery_guard: purged %d replayed/discarded dead letters older than %s days",
        deleted,
        days,
    )
    return deleted


def open_counts() -> list[providers.DeadLetterCount]:
    """Open dead letters (dead or unroutable) by task and queue: the DLQ depth."""
    rows = (
        DeadLetter.objects.filter(status__in=OPEN_STATUSES)
        .values("task_name", "queue")
        .annotate(count=Count("pk"))
        .order_by("task_name", "queue")
    )
    return [providers.DeadLetterCount(r["task_name"], r["queue"], r["count"]) for r in rows]
