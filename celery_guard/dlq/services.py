"""Operator services over the dead-letter table: select, discard, purge, seed for benchmarks."""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import random
import re
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any, cast

from django.db import connections, models, router, transaction
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import Count, Field, QuerySet
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
#: Fake dead letters failed at random over this many days before now.
_DAYS = 90


def _fake_values(
    count: int, *, seed: int, days: int = _DAYS, now: dt.datetime | None = None
) -> Iterator[dict[str, Any]]:
    """Field name -> value of each row :func:`fake_rows` yields: the one definition of the data.

    Fields left out take their model default. Plain values, not model instances: the COPY
    path of :func:`seed` writes a million of these, and a million instances cost about 15 s
    of CPU on top.
    """
    rng = random.Random(seed)
    now = now or timezone.now()
    queues = ["high", "default", "low"]
    statuses = ["dead"] * 8 + ["replayed", "discarded"]
    for n in range(count):
        error, reason = rng.choice(_ERRORS)
        failed_at = now - dt.timedelta(seconds=rng.uniform(0, days * 86400))
        yield {
            "task_name": rng.choice(_TASKS),
            "task_id": str(uuid.UUID(int=rng.getrandbits(128))),
            "queue": rng.choice(queues),
            "args": [n],
            "kwargs": {"customer_id": rng.randint(1, 10**6), "api_key": "sk-seeded"},
            "headers": {"celery_guard": {"v": 1, "attempt": 5, "priority": "default"}},
            "idempotency_key": f"seed:{n}" if n % 3 == 0 else None,
            "tenant": f"tenant-{n % 50}" if n % 2 == 0 else None,
            "reason": reason,
            "exception_class": error,
            "message": f"{error.rsplit('.', 1)[-1]} while processing {n}",
            "traceback": _TRACEBACK,
            "attempts": 5,
            "history": [{"attempt": a, "error": error, "kind": "transient"} for a in range(1, 6)],
            "first_enqueued_at": failed_at - dt.timedelta(minutes=10),
            "failed_at": failed_at,
            "hostname": "worker-1",
            "status": rng.choice(statuses),
        }


def fake_rows(
    count: int, *, seed: int = 0, days: int = _DAYS, now: dt.datetime | None = None
) -> Iterator[DeadLetter]:
    """``count`` realistic, unsaved dead letters spread over the ``days`` days before ``now``."""
    for values in _fake_values(count, seed=seed, days=days, now=now):
        yield DeadLetter(**values)


def _copy_value(field: Field[Any, Any], connection: BaseDatabaseWrapper) -> Callable[[Any], Any]:
    """How a value of ``field`` is handed to COPY: as ``bulk_create`` would send it.

    Except JSON: Django wraps it in psycopg's ``Jsonb``, whose dumper is Python code run per
    value, so it is dumped to text here, with the field's encoder as Django would.
    """
    if isinstance(field, models.JSONField):
        encoder = field.encoder
        return lambda value: None if value is None else json.dumps(value, cls=encoder)
    return functools.partial(field.get_db_prep_save, connection=connection)


def _copy(connection: BaseDatabaseWrapper, rows: Iterable[dict[str, Any]]) -> int:
    """Write ``rows`` (field name -> value) with one ``COPY ... FROM STDIN``; return the count."""
    meta = DeadLetter._meta
    fields = [field for field in meta.concrete_fields if not field.primary_key]
    convert = {field.attname: _copy_value(field, connection) for field in fields}
    # The fields fake data leaves out are the same in every row: convert their defaults once.
    defaults = {field.attname: convert[field.attname](field.get_default()) for field in fields}
    quote = connection.ops.quote_name
    # A concrete field always has a column (the stubs allow None for the others).
    columns = ", ".join(quote(cast(str, field.column)) for field in fields)
    written = 0
    with connection.cursor() as cursor, connection.wrap_database_errors:
        # Django's cursor wrapper has no COPY: the psycopg 3 cursor it wraps has.
        raw = cursor.cursor
        with raw.copy(f"COPY {quote(meta.db_table)} ({columns}) FROM STDIN") as copy:
            for values in rows:
                row = [
                    prep(values[name]) if name in values else defaults[name]
                    for name, prep in convert.items()
                ]
                copy.write_row(row)
                written += 1
    return written


def _psycopg3() -> bool:
    # Imported here: the module imports psycopg or psycopg2, which a SQLite project may lack.
    from django.db.backends.postgresql.psycopg_any import is_psycopg3

    return bool(is_psycopg3)


def seed(count: int, *, batch: int = 5000, seed: int = 0, now: dt.datetime | None = None) -> int:
    """Insert ``count`` fake dead letters (:func:`fake_rows`); return the count.

    On PostgreSQL with psycopg 3 the rows are written with one ``COPY`` (a million in about
    75 s on two cores, where ``bulk_create`` takes about six minutes); elsewhere with
    ``bulk_create`` in batches of ``batch``. On PostgreSQL the table is analyzed afterwards,
    so the changelist's estimated count and the planner see the new size at once.
    """
    connection = connections[router.db_for_write(DeadLetter)]
    if connection.vendor == "postgresql" and _psycopg3():
        written = _copy(connection, _fake_values(count, seed=seed, now=now))
    else:
        rows = fake_rows(count, seed=seed, now=now)
        written = 0
        while written < count:
            chunk: list[Any] = [next(rows) for _ in range(min(batch, count - written))]
            DeadLetter.objects.bulk_create(chunk, batch_size=batch)
            written += len(chunk)
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute(f"ANALYZE {connection.ops.quote_name(DeadLetter._meta.db_table)}")
    return written


def open_counts() -> list[providers.DeadLetterCount]:
    """Open dead letters (dead or unroutable) by task and queue: the DLQ depth."""
    rows = (
        DeadLetter.objects.filter(status__in=OPEN_STATUSES)
        .values("task_name", "queue")
        .annotate(count=Count("pk"))
        .order_by("task_name", "queue")
    )
    return [providers.DeadLetterCount(r["task_name"], r["queue"], r["count"]) for r in rows]
