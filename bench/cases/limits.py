"""Guarded with limits that never bind: ``concurrency`` and ``rate`` far above the load.

What a limit costs when it is not hit: one admission (concurrency and rate at once) before
the body and one release after it, plus the in-process policy read. One variant per limits
store: Redis (one Lua script each: one round trip to admit, one to release) and the database
(on PostgreSQL one function call to admit, one ``DELETE`` to release; on SQLite a short
transaction to admit). Each task has exactly one rule, its own, with one concurrency and one
rate limit: what issue 16's "at most 2 Redis round trips" is stated for (counted by
:mod:`bench.limit_trips`). Issue 16 compares it with "the same task without it": the
routing-only variant (``reference``), not plain Celery.

The store is one global setting (``CELERY_GUARD_LIMITS_BACKEND``), and the runner compares all
variants in one run with one worker, so this module chooses the store per task, as
:mod:`bench.cases.idempotency` chooses the ledger: it wraps
``celery_guard.limits.store.get_store`` with a selector that returns the database store for the
database variant's tasks (the task the worker is executing) and the library's choice
otherwise.
"""

from __future__ import annotations

from typing import Any

from celery import current_task
from django.db import connections

from bench.benchapp import bodies
from bench.cases import Variant, register
from celery_guard import guarded_task
from celery_guard.conf import guard_settings
from celery_guard.limits import dbstore, store

#: The variant of "the same task without it" (issue 16): routing only.
REFERENCE = "guarded-routing"
#: Issue 16's target: a limit that never binds keeps at least 0.95x of the same task's 10 ms
#: drain without it (its other target, at most 2 Redis round trips per task, is
#: ``bench.limit_trips``'s and the report's).
REFERENCE_TARGETS = {"drain_sleep_rate": 0.95}

_original_get_store = store.get_store
#: Names of the tasks whose limits live in the database store.
_database_tasks: set[str] = set()


def _select() -> store.LimitsStore:
    if (getattr(current_task, "name", None) or "") in _database_tasks:
        return dbstore.get_store()
    return _original_get_store()


store.get_store = _select


def _tasks(slug: str) -> dict[str, Any]:
    return {
        kind: guarded_task(
            name=f"bench.{slug}.{kind}",
            priority="default",
            ignore_result=True,
            concurrency=10_000,
            rate="1000000/h",
        )(body)
        for kind, body in bodies.KINDS.items()
    }


def _clear_database() -> None:
    from celery_guard.models import LimitEntry, LimitScope

    LimitEntry.objects.all().delete()
    LimitScope.objects.all().delete()


TASKS = _tasks("limits")
DATABASE_TASKS = _tasks("limits_db")
_database_tasks.update(task.name for task in DATABASE_TASKS.values())

register(
    Variant(
        name="guarded-limits",
        title="routing + a limit that never binds (Redis store)",
        tasks=TASKS,
        queue=guard_settings.priority_queues["default"],
        reference=REFERENCE,
        reference_targets=REFERENCE_TARGETS,
        order=40,
        description=(
            "@guarded_task(priority='default', concurrency=10000, rate='1000000/h'): one Lua "
            "admission before the body and one release after it (Redis), policies read from "
            "memory."
        ),
    )
)
register(
    Variant(
        name="guarded-limits-db",
        title=(
            "routing + a limit that never binds (database store, "
            f"{'PostgreSQL' if connections['default'].vendor == 'postgresql' else 'SQLite'})"
        ),
        tasks=DATABASE_TASKS,
        queue=guard_settings.priority_queues["default"],
        reset=_clear_database,
        needs_database=True,
        reference=REFERENCE,
        reference_targets=REFERENCE_TARGETS,
        order=41,
        description=(
            "The same limits in the database store: one admission (PostgreSQL: one call of "
            "celery_guard_limits_admit, which locks the scope row, counts and inserts) before "
            "the body and one DELETE after it."
        ),
    )
)
