"""Operator services over the dead-letter table: select by filters, purge, seed for benchmarks."""

from __future__ import annotations

import datetime as dt
import logging
import random
import re
import uuid
from collections.abc import Iterator
from typing import Any

from django.db import connections, transaction
from django.db.models import QuerySet
from django.utils import timezone
from django.utils.dateparse import parse_date, parse_datetime

from celery_guard import audit
from celery_guard.conf import guard_settings
from celery_guard.models import DeadLetter

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
        return now - dt.timedelta(seconds=seconds)
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
    statuses: tuple[str, ...] = ("dead", "unroutable"),
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
            DeadLetter.objects.filter(pk__in=[row.pk for row in locked]).update(
                status=DeadLetter.Status.DISCARDED, status_reason=reason
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


_TASKS = [f"shop.tasks.{name}" for name in ("send_email", "charge_card", "sync_crm", "resize")]
_TASKS += [f"billing.jobs.job_{n:02d}" for n in range(16)]
_ERRORS = [
    ("builtins.ValueError", "permanent"),
    ("builtins.TimeoutError", "exhausted"),
    ("requests.exceptions.HTTPError", "exhausted"),
    ("django.core.exceptions.ObjectDoesNotExist", "permanent"),
    ("builtins.ConnectionError", "deadline"),
    ("celery_guard.exceptions.PoisonMessageError", "worker_lost"),
    ("celery_guard.exceptions.HardTimeLimitError", "timeout"),
]
_TRACEBACK = (
    'Traceback (most recent call last):\n  File "/app/shop/tasks.py", line 42, in run\n'
    "    response.raise_for_status()\n" * 8
)


def fake_rows(count: int, *, seed: int = 0, days: int = 90) -> Iterator[DeadLetter]:
    """``count`` realistic, unsaved dead letters spread over the last ``days`` days."""
    rng = random.Random(seed)
    now = timezone.now()
    queues = ["high", "default", "low"]
    statuses = ["dead"] * 8 + ["replayed", "discarded"]
    for n in range(count):
        error, reason = rng.choice(_ERRORS)
        failed_at = now - dt.timedelta(seconds=rng.uniform(0, days * 86400))
        yield DeadLetter(
            task_name=rng.choice(_TASKS),
            task_id=str(uuid.UUID(int=rng.getrandbits(128))),
            queue=rng.choice(queues),
            args=[n],
            kwargs={"customer_id": rng.randint(1, 10**6), "api_key": "sk-seeded"},
            headers={"celery_guard": {"v": 1, "attempt": 5, "priority": "default"}},
            idempotency_key=f"seed:{n}" if n % 3 == 0 else None,
            tenant=f"tenant-{n % 50}" if n % 2 == 0 else None,
            reason=reason,
            exception_class=error,
            message=f"{error.rsplit('.', 1)[-1]} while processing {n}",
            traceback=_TRACEBACK,
            attempts=5,
            history=[{"attempt": a, "error": error, "kind": "transient"} for a in range(1, 6)],
            first_enqueued_at=failed_at - dt.timedelta(minutes=10),
            failed_at=failed_at,
            hostname="worker-1",
            status=rng.choice(statuses),
        )


def seed(count: int, *, batch: int = 5000, seed: int = 0) -> int:
    """Insert ``count`` fake dead letters with ``bulk_create`` in batches; return the count.

    On PostgreSQL the table is analyzed afterwards, so the changelist's estimated count and
    the planner see the new size at once.
    """
    rows = fake_rows(count, seed=seed)
    written = 0
    while written < count:
        chunk: list[Any] = [next(rows) for _ in range(min(batch, count - written))]
        DeadLetter.objects.bulk_create(chunk, batch_size=batch)
        written += len(chunk)
    connection = connections[DeadLetter.objects.db]
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute(f"ANALYZE {connection.ops.quote_name(DeadLetter._meta.db_table)}")
    return written
