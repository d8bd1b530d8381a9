"""Round trips per task of a limit that never binds, counted on the client side, in process.

Redis ``INFO commandstats`` counts the commands a Lua script runs as well as the script call,
so the command counts of the drains are not round trips. This section counts them where they
are sent, in the runner's process, for the tasks of the limits variants: the rules the limits
step builds for the variant's 10 ms task (``rules.rules_for``, no policy), then N times what
the step sends the store for one body shorter than a third of the lease (so no renewal): one
``admit`` (with ``reserve=True`` on the Redis store, as the step asks) and one ``release``.

- Redis: every ``send_packed_command`` of a redis-py connection is one round trip (a single
  command or a whole pipeline; an ``EVALSHA`` that answered ``NOSCRIPT`` and its ``EVAL`` are
  two). Nothing else in the process talks to Redis while it counts.
- PostgreSQL: libpq's protocol trace of the store's connection; each ``Query`` (simple
  protocol, e.g. ``BEGIN``, ``COMMIT``) and each ``Sync`` (the end of an extended-protocol
  statement) the client sends is one round trip. On SQLite, in process, there are none to
  count: the figure is the statements (``CaptureQueriesContext``).

The store's periodic purge (every ``dbstore.PURGE_EVERY`` seconds per process) is left out:
one warm-up admission runs it before the count starts.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import redis.connection

from bench.cases import Variant

#: The variants measured here, and the store each uses.
STORES = {"guarded-limits": "redis", "guarded-limits-db": "database"}


@contextlib.contextmanager
def _redis_sends() -> Iterator[list[int]]:
    """Count the round trips of every redis-py connection of this process."""
    count = [0]
    original: Any = redis.connection.AbstractConnection.send_packed_command

    def counting(self: Any, command: Any, check_health: bool = True) -> None:
        count[0] += 1
        original(self, command, check_health)

    redis.connection.AbstractConnection.send_packed_command = counting  # type: ignore[method-assign]
    try:
        yield count
    finally:
        redis.connection.AbstractConnection.send_packed_command = original  # type: ignore[method-assign]


@contextlib.contextmanager
def _database_trips(alias: str) -> Iterator[list[int]]:
    """Count the round trips of this thread's connection to ``alias`` (see the module)."""
    from django.db import connections
    from django.test.utils import CaptureQueriesContext

    connection = connections[alias]
    connection.ensure_connection()
    count = [0]
    if connection.vendor != "postgresql":
        with CaptureQueriesContext(connection) as queries:
            yield count
        count[0] = len(queries)
        return
    pgconn = connection.connection.pgconn
    fd, path = tempfile.mkstemp(prefix="cg-bench-trace-")
    try:
        pgconn.trace(fd)
        try:
            yield count
        finally:
            pgconn.untrace()
        with open(path, encoding="utf-8", errors="replace") as trace:
            for line in trace:
                fields = line.split("\t")
                # timestamp, direction (F: from the client), length, message type, ...
                if (
                    len(fields) > 3
                    and fields[1] == "F"
                    and fields[3].split(" ")[0]
                    in (
                        "Query",
                        "Sync",
                    )
                ):
                    count[0] += 1
    finally:
        os.close(fd)
        os.unlink(path)


def _measure(
    counter: Callable[[], contextlib.AbstractContextManager[list[int]]],
    admit: Callable[[], Any],
    release: Callable[[Any], None],
    n: int,
) -> dict[str, float]:
    release(admit())  # connect, load the scripts, run the periodic purge: not counted
    holders = []
    with counter() as admits:
        for _ in range(n):
            holders.append(admit())
    with counter() as releases:
        for admission in holders:
            release(admission)
    return {
        "admit": admits[0] / n,
        "release": releases[0] / n,
        "per_task": (admits[0] + releases[0]) / n,
        "n": n,
    }


def measure(variant: Variant, n: int) -> dict[str, Any]:
    """Round trips per task of ``variant``'s 10 ms task: admit, release, and their sum."""
    from celery_guard.conf import guard_settings
    from celery_guard.limits import dbstore, rules, store

    task = variant.tasks["sleep"]
    found: Sequence[rules.Rule] = rules.rules_for(task, None)
    lease = guard_settings.limits_lease
    backend = STORES[variant.name]
    if backend == "redis":
        limits: Any = store.redis_store()

        def counter() -> contextlib.AbstractContextManager[list[int]]:
            return _redis_sends()

        def admit() -> Any:
            return limits.admit(found, lease, reserve=True, held=[])

        engine = "Redis"
    else:
        limits = dbstore.get_store()
        alias = limits.alias

        def counter() -> contextlib.AbstractContextManager[list[int]]:
            return _database_trips(alias)

        def admit() -> Any:
            return limits.admit(found, lease)

        from django.db import connections

        engine = "PostgreSQL" if connections[alias].vendor == "postgresql" else "SQLite"

    def release(admission: Any) -> None:
        if not admission.admitted:
            raise RuntimeError(f"{variant.name}: a limit that never binds refused a run")
        limits.release(found, admission.holder)

    figures: dict[str, Any] = _measure(counter, admit, release, n)
    figures["store"] = engine
    figures["unit"] = "statements" if engine == "SQLite" else "round trips"
    figures["rules"] = [
        {
            "scope": rule.scope,
            "concurrency": rule.concurrency,
            "rate": str(rule.rate) if rule.rate else None,
        }
        for rule in found
    ]
    return figures


def run(variants: Sequence[Variant], n: int) -> dict[str, Any]:
    """Measure every limits variant among ``variants`` (empty when none was run)."""
    return {v.name: measure(v, n) for v in variants if v.name in STORES}
