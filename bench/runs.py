"""Bulk-run benchmarks: ``start_run`` of N items, a run's drain against a group, flat memory.

``python -m bench.runs --n N`` runs in a process of its own with the runner's environment
(its database and Redis broker) and prints one JSON object, like :mod:`bench.delivery`:

* ``claims``: the ledger's part of a start: ``n`` keys claimed and confirmed one by one
  (``claim`` + ``confirm``, two round trips each, as a publish of one call does) against
  ``claim_many`` + ``confirm_many`` per chunk of 1,000 (what ``start_run`` does), on each
  ledger, in the same run; the ratio is one by one / in bulk (seconds).
* ``start``: seconds of ``start_run`` of ``n`` items (validated, written, keys claimed,
  published) on the Redis ledger and on the database ledger, next to a loop of ``n`` plain
  ``apply_async`` calls of the same guarded task, in the same run.
* ``memory``: the peak Python memory (``tracemalloc``) of ``start_run`` over ``n`` and over
  ``4 n`` items given as a generator; flat means a ratio near 1 (items are read, written and
  published in chunks).
* ``drain``: ``n`` 10 ms tasks drained by one prefork worker (2 processes), as a plain Celery
  ``group`` of a plain task, a ``group`` of the same body as a guarded task, a ``group`` of
  that guarded task with one idempotency key per call (``keyed_group``, on the database
  ledger), and a bulk run of that guarded task (until the run is final); the ratios are run /
  group (rates, higher is better). Each item of a run has an idempotency key (a run needs
  one: the sweep settles an item from its key's ledger record), so the keyed group is the
  same tasks without a run, and the issue's target (a run costs at most 10% more) is checked
  against it. ``run_redis`` and ``keyed_group_redis`` are the run and the keyed group again
  with the keys on the Redis ledger instead of the database one.

* ``bookkeeping``: a worker's writes of an item (``start_item`` then ``finish_item``), timed
  in this process over the items of a run, on the one-statement path (PostgreSQL) and on the
  portable one (a transaction of several statements, synchronously committed: what every
  database used before), alternated in chunks, in the same run; with the statements per item.

``--drain-only`` skips ``claims``, ``start``, ``memory`` and ``bookkeeping``.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import tracemalloc
from typing import Any

from bench import child, naming, stats

#: The ledgers ``start_run`` is timed on.
LEDGERS = ("redis", "database")


def _purge(app: Any, *queues: str) -> None:
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        for queue in queues:
            channel.queue_purge(queue)


def _items(n: int, counter: str) -> Any:
    return ({"counter": counter, "ident": i} for i in range(n))


def _wait(done: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise RuntimeError("bench.runs: the drain did not finish in time")
        time.sleep(0.02)


def measure_start(app: Any, n: int) -> dict[str, Any]:
    """Time ``start_run`` of ``n`` items on each ledger, and ``n`` plain publishes."""
    from django.test.utils import override_settings

    from bench.benchapp.run_tasks import guarded
    from celery_guard import start_run
    from celery_guard.conf import guard_settings

    queue = guard_settings.priority_queues["default"]
    result: dict[str, Any] = {"n": n}
    for backend in LEDGERS:
        with override_settings(CELERY_GUARD_IDEMPOTENCY_BACKEND=backend):
            started = time.perf_counter()
            run = start_run(guarded, _items(n, "unused"), name=f"bench start {backend}")
            seconds = time.perf_counter() - started
        if not run.published:
            raise RuntimeError(f"bench.runs: run {run.pk} was not published whole")
        result[backend] = {"seconds": seconds, "items_per_s": stats.rate(n, seconds)}
        _purge(app, queue)
    started = time.perf_counter()
    with app.producer_or_acquire() as producer:
        for i in range(n):
            guarded.apply_async(kwargs={"counter": "unused", "ident": i}, producer=producer)
    seconds = time.perf_counter() - started
    result["plain_apply_async"] = {"seconds": seconds, "items_per_s": stats.rate(n, seconds)}
    _purge(app, queue)
    return result


def measure_claims(n: int) -> dict[str, Any]:
    """The ledger's work of a start: ``n`` keys one by one, then in bulk, on each ledger."""
    import uuid

    from django.test.utils import override_settings

    from celery_guard.idempotency import ledger
    from celery_guard.models import IdempotencyRecord

    prefix = f"{naming.prefix()}:claims:{uuid.uuid4().hex[:8]}"
    fingerprint = "f" * 64
    result: dict[str, Any] = {"n": n}
    for backend in LEDGERS:
        with override_settings(CELERY_GUARD_IDEMPOTENCY_BACKEND=backend):
            store = ledger.get_ledger()
            news = [
                ledger.NewClaim(f"{prefix}:{backend}:{i}", f"t{i}", fingerprint, 600.0)
                for i in range(2 * n)
            ]
            one, bulk = news[:n], news[n:]
            started = time.perf_counter()
            for c in one:
                store.claim(
                    c.key,
                    task_name="bench",
                    task_id=c.task_id,
                    fingerprint=c.fingerprint,
                    window=c.window,
                )
                store.confirm(c.key, c.task_id)
            one_by_one = time.perf_counter() - started
            started = time.perf_counter()
            for start in range(0, n, 1000):
                chunk = bulk[start : start + 1000]
                store.claim_many(chunk, task_name="bench")
                store.confirm_many([(c.key, c.task_id) for c in chunk])
            in_bulk = time.perf_counter() - started
        result[backend] = {
            "one_by_one_s": one_by_one,
            "bulk_s": in_bulk,
            "ratio": stats.ratio(one_by_one, in_bulk),
        }
    IdempotencyRecord.objects.filter(key__startswith=prefix).delete()
    return result


def measure_memory(app: Any, n: int) -> dict[str, Any]:
    """Peak traced memory of ``start_run`` over ``n`` and ``4 n`` items (a generator)."""
    from bench.benchapp.run_tasks import guarded
    from celery_guard import start_run
    from celery_guard.conf import guard_settings

    peaks: dict[str, int] = {}
    for size in (n, 4 * n):
        gc.collect()
        tracemalloc.start()
        start_run(guarded, _items(size, "unused"), name=f"bench memory {size}")
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        peaks[str(size)] = peak
        _purge(app, guard_settings.priority_queues["default"])
    small, large = peaks[str(n)], peaks[str(4 * n)]
    return {"peak_bytes": peaks, "ratio_4n_to_n": large / small if small else None}


def measure_bookkeeping(app: Any, n: int) -> dict[str, Any]:
    """Seconds per item of ``start_item`` + ``finish_item``, one-statement vs portable path."""
    from unittest import mock

    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from bench.benchapp.run_tasks import guarded
    from celery_guard import start_run
    from celery_guard.conf import guard_settings
    from celery_guard.models import BulkRunItem
    from celery_guard.runs import services

    fast = services._fast_connection
    paths: dict[str, Any] = {"one_statement": fast, "portable": lambda: None}
    if fast() is None:
        del paths["one_statement"]  # SQLite: the portable path only
    done = BulkRunItem.Status.SUCCEEDED
    runs: dict[str, int] = {}
    items: dict[str, list[int]] = {}
    statements: dict[str, int] = {}
    seconds = dict.fromkeys(paths, 0.0)
    for kind, path in paths.items():
        run = start_run(guarded, _items(n + 2, "unused"), name=f"bench bookkeeping {kind}")
        _purge(app, guard_settings.priority_queues["default"])
        ids = list(BulkRunItem.objects.filter(run=run).order_by("seq").values_list("pk", flat=True))
        runs[kind], items[kind] = run.pk, ids[2:]
        with mock.patch.object(services, "_fast_connection", path):
            services.start_item(run.pk, ids[0], mark_run=True)  # the once-per-process mark
            with CaptureQueriesContext(connection) as queries:
                services.start_item(run.pk, ids[1], mark_run=False)
                services.finish_item(run.pk, ids[1], done)
        statements[kind] = len(queries)
    for first in range(0, n, 50):  # chunks alternated: drifts of the machine land on both
        for kind, path in paths.items():
            with mock.patch.object(services, "_fast_connection", path):
                started = time.perf_counter()
                for pk in items[kind][first : first + 50]:
                    services.start_item(runs[kind], pk, mark_run=False)
                    services.finish_item(runs[kind], pk, done)
                seconds[kind] += time.perf_counter() - started
    per_item = {kind: 1000 * spent / n for kind, spent in seconds.items()}
    return {
        "n": n,
        "ms_per_item": per_item,
        # As Django counts them: a transaction's BEGIN and COMMIT included (round trips).
        "statements_per_item": statements,
        "ratio": stats.ratio(per_item.get("portable", 0.0), per_item.get("one_statement", 0.0)),
    }


def measure_drain(app: Any, n: int, reps: int) -> dict[str, Any]:
    """Drain ``n`` 10 ms tasks as groups (plain, guarded, keyed) and as a run, ``reps`` times."""
    import uuid

    from celery import group

    from bench.benchapp.bodies import _redis
    from bench.benchapp.run_tasks import PLAIN_QUEUE, guarded, guarded_redis, plain
    from bench.cases import idempotency
    from bench.worker import BenchWorker
    from celery_guard import start_run
    from celery_guard.conf import guard_settings
    from celery_guard.models import BulkRun

    guarded_queue = guard_settings.priority_queues["default"]
    client = _redis()
    counter = f"{naming.prefix()}:runs:count"
    timeout = max(120.0, n * 0.05)
    rates: dict[str, list[float]] = {
        "plain_group": [],
        "guarded_group": [],
        "keyed_group": [],
        "run": [],
        "keyed_group_redis": [],
        "run_redis": [],
    }
    publish_s: dict[str, list[float]] = {kind: [] for kind in rates}

    def drained() -> bool:
        return int(client.get(counter) or 0) >= n

    def one(kind: str) -> float:
        client.delete(counter)
        started = time.perf_counter()
        if kind in ("run", "run_redis"):
            if kind == "run":
                run = start_run(guarded, _items(n, counter), name="bench drain")
            else:
                with idempotency.publishing_with(idempotency.redis_ledger):
                    run = start_run(guarded_redis, _items(n, counter), name="bench drain")
            publish_s[kind].append(time.perf_counter() - started)
            _wait(
                lambda: BulkRun.objects.filter(pk=run.pk, finished_at__isnull=False).exists(),
                timeout,
            )
        elif kind in ("keyed_group", "keyed_group_redis"):
            # The run's tasks without the run: one new key per call, as each item has.
            tag = uuid.uuid4().hex[:12]
            keyed = guarded if kind == "keyed_group" else guarded_redis
            calls = group(
                keyed.s(counter=counter, ident=i).set(guard={"idempotency_key": f"{tag}:{i}"})
                for i in range(n)
            )
            if kind == "keyed_group":
                calls.apply_async()
            else:
                with idempotency.publishing_with(idempotency.redis_ledger):
                    calls.apply_async()
            publish_s[kind].append(time.perf_counter() - started)
            _wait(drained, timeout)
        else:
            task = plain if kind == "plain_group" else guarded
            group(task.s(counter=counter, ident=i) for i in range(n)).apply_async()
            publish_s[kind].append(time.perf_counter() - started)
            _wait(drained, timeout)
        return stats.rate(n, time.perf_counter() - started)

    worker = BenchWorker(app, naming.prefix(), name="runs")
    worker.start()
    try:
        worker.consume(PLAIN_QUEUE)
        worker.consume(guarded_queue)
        one("run")  # warm-up: connections, imports, the ledger's scripts
        one("run_redis")
        for _ in range(reps):
            for kind in rates:  # A B C A B C: drifts of a shared machine land on every side
                rates[kind].append(one(kind))
    finally:
        worker.stop()
    summary = {kind: stats.summarize(values) for kind, values in rates.items()}
    median = {kind: summary[kind]["median"] for kind in rates}
    return {
        "n": n,
        "reps": reps,
        "per_s": summary,
        # Seconds until start_run / group.apply_async returned (all published): the workers
        # drain meanwhile, so a slow publish bounds the drain rate.
        "publish_s": {
            kind: stats.summarize(values[1:] if kind.startswith("run") else values)
            for kind, values in publish_s.items()
        },
        "run_vs_guarded_group": stats.ratio(median["run"], median["guarded_group"]),
        "run_vs_plain_group": stats.ratio(median["run"], median["plain_group"]),
        "run_vs_keyed_group": stats.ratio(median["run"], median["keyed_group"]),
        "run_redis_vs_guarded_group": stats.ratio(median["run_redis"], median["guarded_group"]),
        "run_redis_vs_keyed_group_redis": stats.ratio(
            median["run_redis"], median["keyed_group_redis"]
        ),
    }


def measure(
    n: int, drain_n: int, reps: int, memory_n: int, drain_only: bool = False
) -> dict[str, Any]:
    """Run the three benchmarks on this process's database and the run's Redis broker."""
    from celery import current_app
    from django.core.management import call_command
    from django.db import connection
    from django.test.utils import override_settings

    call_command("migrate", verbosity=0)
    app = current_app._get_current_object()
    result: dict[str, Any] = {"engine": connection.vendor}
    # The example project runs with DEBUG, which keeps the last 9,000 SQL statements in
    # memory and costs time per query: not what a production start_run pays.
    with override_settings(DEBUG=False):
        if not drain_only:
            result["claims"] = measure_claims(n)
            result["start"] = measure_start(app, n)
            result["memory"] = measure_memory(app, memory_n)
            result["bookkeeping"] = measure_bookkeeping(app, min(n, 1000))
    if drain_n:
        result["drain"] = measure_drain(app, drain_n, reps)
    return result


def run(n: int, drain_n: int, reps: int, memory_n: int) -> dict[str, Any]:
    """Run :func:`measure` in a child process with the runner's environment.

    Raises:
        RuntimeError: The child failed.
    """
    args = ["--n", str(n), "--drain-n", str(drain_n), "--reps", str(reps)]
    return child.run("bench.runs", [*args, "--memory-n", str(memory_n)])


def table(runs: dict[str, Any]) -> str:
    """The Markdown section of the results."""
    claims, start, memory = runs["claims"], runs["start"], runs["memory"]
    lines = [
        f"The ledger's part of a start, {claims['n']:,} keys claimed and confirmed "
        f"({runs['engine']}):",
        "",
        "| ledger | one by one (s) | `claim_many` + `confirm_many` (s) | ratio |",
        "|---|---|---|---|",
    ]
    for backend in LEDGERS:
        cost = claims[backend]
        lines.append(
            f"| {backend} | {cost['one_by_one_s']:.2f} | {cost['bulk_s']:.2f} | "
            f"{cost['ratio'] or 0:.1f} |"
        )
    lines += [
        "",
        f"`start_run` of {start['n']:,} items:",
        "",
        "| `start_run` | seconds | items per second |",
        "|---|---|---|",
    ]
    for backend in LEDGERS:
        lines.append(
            f"| {backend} ledger | {start[backend]['seconds']:.2f} | "
            f"{start[backend]['items_per_s']:,.0f} |"
        )
    plain = start["plain_apply_async"]
    lines.append(
        f"| (reference: {start['n']:,} `apply_async` of the task, no run) | "
        f"{plain['seconds']:.2f} | {plain['items_per_s']:,.0f} |"
    )
    peaks = memory["peak_bytes"]
    sizes = sorted(peaks, key=int)
    lines += [
        "",
        "| peak memory of `start_run` | "
        + " | ".join(f"{int(s):,} items" for s in sizes)
        + " | ratio |",
        "|---|" + "---|" * (len(sizes) + 1),
        "| traced (MiB) | "
        + " | ".join(f"{peaks[s] / 2**20:.1f}" for s in sizes)
        + f" | {memory['ratio_4n_to_n'] or 0:.2f} |",
    ]
    books = runs.get("bookkeeping")
    if books:
        per_item, counted = books["ms_per_item"], books["statements_per_item"]
        lines += [
            "",
            f"A worker's writes of an item (`start_item` + `finish_item`), {books['n']:,} items "
            "in this process:",
            "",
            "| path | ms per item | statements per item |",
            "|---|---|---|",
        ]
        for kind, title in (
            ("one_statement", "one statement each, asynchronous commit (PostgreSQL)"),
            ("portable", "a transaction of several statements (SQLite; PostgreSQL before)"),
        ):
            if kind in per_item:
                lines.append(f"| {title} | {per_item[kind]:.2f} | {counted[kind]} |")
    drain = runs.get("drain")
    if drain:
        per_s = drain["per_s"]
        pub = {
            kind: (drain.get("publish_s") or {}).get(kind, {}).get("median") or 0.0
            for kind in per_s
        }
        lines += [
            "",
            f"Drain of {drain['n']:,} 10 ms tasks, one worker (2 processes), median of "
            f"{drain['reps']}:",
            "",
            "| drained as | tasks per second | of which publishing (s) | run / this |",
            "|---|---|---|---|",
            f"| plain Celery `group` | {per_s['plain_group']['median']:,.0f} | "
            f"{pub['plain_group']:.2f} | {drain['run_vs_plain_group'] or 0:.2f} |",
            f"| guarded task, `group` | {per_s['guarded_group']['median']:,.0f} | "
            f"{pub['guarded_group']:.2f} | {drain['run_vs_guarded_group'] or 0:.2f} |",
        ]
        if "keyed_group" in per_s:
            lines.append(
                "| guarded task, `group`, a key per call (the same tasks without a run: "
                f"the target) | {per_s['keyed_group']['median']:,.0f} | "
                f"{pub['keyed_group']:.2f} | **{drain.get('run_vs_keyed_group') or 0:.2f}** |"
            )
        lines.append(
            f"| guarded task, bulk run | {per_s['run']['median']:,.0f} | {pub['run']:.2f} | 1.00 |"
        )
        if "keyed_group_redis" in per_s:
            lines.append(
                f"| the keyed `group`, its keys on the Redis ledger | "
                f"{per_s['keyed_group_redis']['median']:,.0f} | {pub['keyed_group_redis']:.2f} | "
                f"(the run on Redis / this: "
                f"{drain.get('run_redis_vs_keyed_group_redis') or 0:.2f}) |"
            )
        if "run_redis" in per_s:
            lines.append(
                f"| the bulk run, its keys on the Redis ledger | "
                f"{per_s['run_redis']['median']:,.0f} | {pub['run_redis']:.2f} | "
                f"(vs the guarded group: {drain.get('run_redis_vs_guarded_group') or 0:.2f}) |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the child process: measure and print the JSON."""
    parser = argparse.ArgumentParser(prog="python -m bench.runs")
    parser.add_argument("--n", type=int, default=8000, help="items of the timed start_run")
    parser.add_argument("--drain-n", type=int, default=600, help="tasks per drain (0: none)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--memory-n", type=int, default=1000, help="memory at n and 4 n items")
    parser.add_argument("--drain-only", action="store_true", help="only the drain")
    args = parser.parse_args(argv)
    import django

    django.setup()
    result = measure(args.n, args.drain_n, args.reps, args.memory_n, args.drain_only)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
