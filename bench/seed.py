"""Fake dead letters for the changelist benchmark: ``python -m bench seed-dead-letters COUNT``.

Realistic rows spread over 90 days, written with one ``COPY`` on PostgreSQL (psycopg 3) and
with ``bulk_create`` elsewhere. Benchmark tooling, not part of the installed package.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import random
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any, cast

from django.db import connections, models, router
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import Field
from django.utils import timezone

from celery_guard.models import DeadLetter

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
