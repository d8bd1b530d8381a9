"""Guarded, routing + idempotency key: one variant per ledger backend (issue 3).

Every task has ``idempotency_key="bench:{ident}"``; ``ident`` is unique within the run, so
every call claims a fresh key (the normal, non-duplicate path: claim at enqueue, start and
finish around the body). The duplicate decision is timed separately (:mod:`bench.micro`).

The ledger backend is one global setting (``CELERY_GUARD_IDEMPOTENCY_BACKEND``), and the
runner compares all variants in one run with one worker, so this module chooses the ledger
per task: it wraps ``celery_guard.idempotency.ledger.get_ledger`` with a selector that returns the
ledger of the variant being published (a context variable set by the variant's ``send``)
or run (the task the worker is executing). The selector builds a ledger on every call, as
``get_ledger`` does, so the measured cost is the library's.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from celery import current_task
from django.conf import settings
from django.db import connections

from bench import naming
from bench.benchapp import bodies
from bench.cases import ISSUE_TARGETS, Variant, register
from celery_guard import guarded_task
from celery_guard.conf import guard_settings
from celery_guard.idempotency import ledger as ledger_module

LedgerFactory = Callable[[], ledger_module.Ledger]

_original_get_ledger = ledger_module.get_ledger
_publishing: contextvars.ContextVar[LedgerFactory | None] = contextvars.ContextVar(
    "bench_ledger", default=None
)
#: Task name -> the ledger its variant uses.
_by_task: dict[str, LedgerFactory] = {}


class AliasLedger(ledger_module.DatabaseLedger):
    """The database ledger on a given database alias (here: the bench's SQLite file)."""

    def __init__(self, alias: str) -> None:
        self.alias = alias

    def using(self) -> str:
        """Database alias the ledger writes to."""
        return self.alias


def _select() -> ledger_module.Ledger:
    factory = _publishing.get()
    if factory is None:
        factory = _by_task.get(getattr(current_task, "name", None) or "")
    return factory() if factory is not None else _original_get_ledger()


ledger_module.get_ledger = _select


def _sender(factory: LedgerFactory) -> Callable[[Any, tuple[Any, ...], int], Any]:
    def send(task: Any, args: tuple[Any, ...], ident: int) -> Any:
        token = _publishing.set(factory)
        try:
            return task.apply_async(args)
        finally:
            _publishing.reset(token)

    return send


def use_ledger(task_name: str, factory: LedgerFactory) -> None:
    """Make the worker's ledger of ``task_name`` the one ``factory`` builds."""
    _by_task[task_name] = factory


@contextlib.contextmanager
def publishing_with(factory: LedgerFactory) -> Iterator[None]:
    """Publish (claim keys) on the ledger ``factory`` builds while in the block."""
    token = _publishing.set(factory)
    try:
        yield
    finally:
        _publishing.reset(token)


def database_ledger() -> ledger_module.Ledger:
    """The database ledger on the run's database (the default alias)."""
    return ledger_module.DatabaseLedger()


def sqlite_ledger() -> ledger_module.Ledger:
    """The database ledger on the bench's extra SQLite database."""
    return AliasLedger(naming.LEDGER_SQLITE_ALIAS)


def redis_ledger() -> ledger_module.Ledger:
    """The Redis ledger on the broker's Redis, under the run's key prefix.

    The one ``get_ledger`` returns with ``CELERY_GUARD_IDEMPOTENCY_BACKEND = "redis"``, found
    the same way (the broker's URL kept per settings), so the bench measures that path.
    """
    return ledger_module.settings_redis_ledger()


def _clear_database(alias: str) -> Callable[[], None]:
    def reset() -> None:
        from celery_guard.models import IdempotencyRecord

        IdempotencyRecord.objects.using(alias).all().delete()

    return reset


def _clear_redis() -> None:
    store = redis_ledger()
    assert isinstance(store, ledger_module.RedisLedger)
    keys = list(store.client.scan_iter(match=f"{store.prefix}*", count=1000))
    for start in range(0, len(keys), 1000):
        store.client.delete(*keys[start : start + 1000])


def _variant(
    slug: str,
    title: str,
    factory: LedgerFactory,
    reset: Callable[[], None],
    description: str,
    targets: Mapping[str, float],
    order: int,
) -> Variant:
    tasks = {
        kind: guarded_task(
            name=f"bench.idem_{slug}.{kind}",
            priority="default",
            ignore_result=True,
            idempotency_key="bench:{ident}",
        )(body)
        for kind, body in bodies.KINDS.items()
    }
    for task in tasks.values():
        _by_task[task.name] = factory
    return register(
        Variant(
            name=f"guarded-idem-{slug}",
            title=title,
            tasks=tasks,
            queue=guard_settings.priority_queues["default"],
            send=_sender(factory),
            reset=reset,
            needs_database=True,
            targets=targets,
            description=description,
            order=order,
        )
    )


def _engine(alias: str) -> str:
    return "PostgreSQL" if connections[alias].vendor == "postgresql" else "SQLite"


_variant(
    "db",
    f"routing + idempotency key (database ledger, {_engine('default')})",
    database_ledger,
    _clear_database("default"),
    "idempotency_key='bench:{ident}' on the database ledger in the run's database: a claim "
    "(INSERT) at enqueue, a start and a finish (conditional UPDATEs) around the body.",
    {"drain_noop_rate": 0.50},  # issue 12, on PostgreSQL
    30,
)
if naming.LEDGER_SQLITE_ALIAS in settings.DATABASES:
    _variant(
        "sqlite",
        "routing + idempotency key (database ledger, SQLite)",
        sqlite_ledger,
        _clear_database(naming.LEDGER_SQLITE_ALIAS),
        "The same, with the ledger in a SQLite file (WAL).",
        {},
        40,
    )
_variant(
    "redis",
    "routing + idempotency key (Redis ledger)",
    redis_ledger,
    _clear_redis,
    "idempotency_key='bench:{ident}' on the Redis ledger (the broker's Redis): one Lua "
    "script at enqueue (claim), two around the body (start, finish).",
    ISSUE_TARGETS,  # the issue's targets are set for the Redis ledger
    20,
)
