"""Database commits of the bench's worker processes, counted in the processes that make them.

PostgreSQL's ``pg_stat_database`` cannot give a drain's commits: a backend reports its counts
at most once a second and keeps a busy connection's later ones pending, often until the
connection closes (measured on PostgreSQL 15: three bursts of 100 commits a few seconds
apart on one connection showed up only when it closed). A worker keeps its connections, so
a window read from those statistics moved its commits into other variants' windows.

Every process of the run that sets :data:`ENV` (the runner passes it to its workers) counts
here what reaches the database through Django: a statement in autocommit mode and a commit
of a transaction are one commit each. Each commit is put in one :data:`KINDS` by the table
its statement (a transaction: any of its statements) names:

* ``policy``: the task-policy refresh (each worker process every ``CELERY_GUARD_POLICY_REFRESH``);
* ``rollups``: the rollup flush (each process every ``CELERY_GUARD_ROLLUP_FLUSH_SECONDS``);
* ``poller``: the delivery poller's lease and outbox (the main process, every poll);
* ``task``: anything else (a task's own work: the database ledger, a dead letter...).

The first three are periodic: they depend on time, not on the number of tasks. Each process
keeps its counts in a file of its own in the :data:`ENV` directory (one ``pwrite`` per
commit); :func:`read` adds them up.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

#: The directory of the per-process count files; counting is on when it is set.
ENV = "CG_BENCH_DB_COUNTS"
#: Kinds of commits, in the order of the count files' fields.
KINDS = ("task", "policy", "rollups", "poller")
#: The periodic kinds (time-based, not per task).
PERIODIC = ("policy", "rollups", "poller")
_TABLES = (
    ("celery_guard_taskpolicy", "policy"),
    ("celery_guard_taskminute", "rollups"),
    ("celery_guard_deliverylease", "poller"),
    ("celery_guard_outboxmessage", "poller"),
)
_FORMAT = struct.Struct(f"<{len(KINDS)}q")

_lock = threading.Lock()
_counts = [0] * len(KINDS)
_file: list[tuple[int, int] | None] = [None]  # (pid, fd) of this process's file


def _kind(sql: str) -> int:
    for table, kind in _TABLES:
        if table in sql:
            return KINDS.index(kind)
    return 0


def _bump(kind: int) -> None:
    pid = os.getpid()
    with _lock:
        opened = _file[0]
        if opened is None or opened[0] != pid:
            if opened is not None:
                _counts[:] = [0] * len(KINDS)  # a forked child counts its own
            path = Path(os.environ[ENV]) / f"{pid}.counts"
            opened = _file[0] = (pid, os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        _counts[kind] += 1
        os.pwrite(opened[1], _FORMAT.pack(*_counts), 0)


def _counting(
    execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Mapping[str, Any]
) -> Any:
    connection = context["connection"]
    kind = _kind(str(sql))
    try:
        return execute(sql, params, many, context)
    finally:
        if connection.autocommit and not connection.in_atomic_block:
            _bump(kind)
        elif kind:
            # A transaction that touched a periodic table commits as that kind (its
            # savepoint statements name no table).
            connection.cg_bench_txn_kind = kind


def _watch(sender: Any, connection: Any, **kwargs: Any) -> None:
    """``connection_created`` receiver: count this connection's statements and commits."""
    if getattr(connection, "cg_bench_counted", False):
        return
    connection.cg_bench_counted = True
    connection.execute_wrappers.append(_counting)
    commit = connection.commit

    def counted_commit() -> None:
        commit()
        _bump(getattr(connection, "cg_bench_txn_kind", 0))
        connection.cg_bench_txn_kind = 0

    connection.commit = counted_commit


def install() -> None:
    """Count this process's commits when :data:`ENV` is set (the bench app's ``ready``)."""
    if not os.environ.get(ENV):
        return
    from django.db.backends.signals import connection_created

    connection_created.connect(_watch, dispatch_uid="bench.dbcount", weak=False)


def read(directory: str, exclude: int | None = None) -> dict[str, int]:
    """The commits counted so far by every process, by kind (``exclude``: a pid left out)."""
    totals = dict.fromkeys(KINDS, 0)
    for path in Path(directory).glob("*.counts"):
        if exclude is not None and path.stem == str(exclude):
            continue
        raw = path.read_bytes()
        if len(raw) < _FORMAT.size:
            continue
        for kind, value in zip(KINDS, _FORMAT.unpack(raw[: _FORMAT.size]), strict=True):
            totals[kind] += value
    return totals
