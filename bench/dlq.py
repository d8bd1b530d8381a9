"""Dead-letter benchmarks: admin changelist timings at scale and bulk replay throughput.

``python -m bench.dlq --rows N [--rows M ...] --replay-n K`` runs in a process of its own
with the runner's environment (its database and Redis) and prints one JSON object, like
:mod:`bench.micro`. The changelist is requested in-process through Django's test ``Client``
as a superuser, against dead letters seeded with :func:`bench.seed.seed` (PostgreSQL
only: the scale work of the changelist, estimated counts and loose index scans, is
PostgreSQL's). Bulk replay runs :func:`celery_guard.dlq.replay.replay`, the service function of
``celery_guard replay`` and the admin action, without a rate limit, publishing to a queue
nobody consumes; the queue, the rows and the user are removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

from bench import child, naming, stats
from bench.benchapp import bodies

CHANGELIST = "/admin/celery_guard/deadletter/"
#: Task of the replayed dead letters: the baseline's no-op (registered, binds ``[ident]``).
REPLAY_TASK = "bench.plain.noop"
#: Timed repetitions per request kind (after one untimed warm-up request).
REPS = 7


def requests(sample: Any) -> list[tuple[str, dict[str, str]]]:
    """The changelist requests to time: (label, query parameters), from a sample row."""
    return [
        ("first page", {}),
        ("filter: reason", {"reason__exact": sample.reason}),
        ("filter: status", {"status__exact": "dead"}),
        ("filter: task name", {"task_name": sample.task_name}),
        ("filter: exception class", {"exception_class": sample.exception_class}),
        ("filter: queue", {"queue": sample.queue}),
        ("date hierarchy: year", {"failed_at__year": str(sample.failed_at.year)}),
        ("search: idempotency key", {"q": sample.idempotency_key or ""}),
        ("search: task id", {"q": sample.task_id}),
    ]


def time_changelist(client: Any, reps: int = REPS) -> dict[str, Any]:
    """Time every request kind of :func:`requests` ``reps`` times; count its SQL queries."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from celery_guard.models import DeadLetter

    sample = DeadLetter.objects.filter(idempotency_key__isnull=False).order_by("-pk").first()
    if sample is None:
        raise RuntimeError("no seeded dead letter with an idempotency key")
    figures: dict[str, Any] = {}
    for label, params in requests(sample):
        client.get(CHANGELIST, params)  # warm-up: caches, plans, templates
        times = []
        queries: set[int] = set()
        status = 0
        for _ in range(reps):
            with CaptureQueriesContext(connection) as captured:
                t = time.perf_counter()
                response = client.get(CHANGELIST, params)
                times.append(time.perf_counter() - t)
            status = response.status_code
            if status != 200:
                raise RuntimeError(f"{label}: HTTP {status}")
            queries.add(len(captured.captured_queries))
        figures[label] = {
            "p50_ms": stats.percentile(times, 50) * 1e3,
            "p95_ms": stats.percentile(times, 95) * 1e3,
            "queries": max(queries),
            "queries_min": min(queries),
            "n": reps,
        }
    return figures


def changelist(sizes: list[int], log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Seed up to each size in turn (bulk, the seed service) and time the changelist there."""
    from django.contrib.auth import get_user_model
    from django.test import Client

    from bench import seed as seeding
    from celery_guard.models import DeadLetter

    user_model = get_user_model()
    name = f"{naming.prefix()}-admin"
    user = user_model.objects.create_superuser(name, f"{name}@example.invalid", uuid.uuid4().hex)
    client = Client()
    client.force_login(user)
    results = []
    seeded = 0
    try:
        for size in sorted(sizes):
            added = size - seeded
            t = time.perf_counter()
            # A new seed per step: the rows added to reach the next size differ from the first.
            seeding.seed(added, batch=5000, seed=size)
            seed_s = time.perf_counter() - t
            seeded = size
            log(f"seeded {added:,} dead letters in {seed_s:.0f}s; timing the changelist")
            results.append(
                {
                    "rows": DeadLetter.objects.count(),
                    "seed_s": seed_s,
                    "requests": time_changelist(client),
                }
            )
    finally:
        _truncate()
        user.delete()
    return results


def _truncate() -> None:
    """Empty the dead-letter tables of the bench database (a DELETE of a million rows is slow)."""
    from django.db import connection

    from celery_guard.models import DeadLetter, DeadLetterReplay

    tables = [connection.ops.quote_name(m._meta.db_table) for m in (DeadLetterReplay, DeadLetter)]
    with connection.cursor() as cursor:
        cursor.execute(f"TRUNCATE {', '.join(tables)}")


def bulk_replay(n: int, queue: str) -> dict[str, Any]:
    """Seed ``n`` dead no-op tasks routed to ``queue``, replay them all, count what arrived."""
    import redis

    import bench.benchapp.tasks  # noqa: F401  (registers the replayed task)
    from bench import seed as seeding
    from celery_guard.dlq import replay
    from celery_guard.models import DeadLetter, DeadLetterReplay
    from proj.celery import app

    rows = []
    for i, row in enumerate(seeding.fake_rows(n, seed=1)):
        row.task_name = REPLAY_TASK
        row.queue = queue
        row.args = [i]
        row.kwargs = {}
        row.idempotency_key = None
        row.status = "dead"
        rows.append(row)
    created = DeadLetter.objects.bulk_create(rows, batch_size=5000)
    ids = [row.pk for row in created]
    broker = redis.Redis.from_url(os.environ[bodies.BROKER_ENV])
    key = f"{naming.prefix()}:{queue}"  # the run's global key prefix (bench/settings.py)
    try:
        t = time.perf_counter()
        summary = replay.replay(ids, app=app, via="bench")
        elapsed = time.perf_counter() - t
        published = int(broker.llen(key))
    finally:
        # The messages, and the exchange bindings kombu declared with the queue.
        prefix = naming.prefix()
        broker.delete(
            key, f"{prefix}:_kombu.binding.{queue}", f"{prefix}:_kombu.binding_permanent.{queue}"
        )
        DeadLetterReplay.objects.filter(dead_letter_id__in=ids).delete()
        DeadLetter.objects.filter(pk__in=ids).delete()
        broker.close()
    return {
        "rows": n,
        "seconds": elapsed,
        "rows_per_s": stats.rate(summary.replayed, elapsed),
        "replayed": summary.replayed,
        "skipped": summary.skipped,
        "unroutable": summary.unroutable,
        "published": published,
    }


def measure(sizes: list[int], replay_n: int) -> dict[str, Any]:
    """Run both benchmarks on this process's default database and the run's Redis."""
    from django.conf import settings
    from django.core.management import call_command
    from django.db import connection

    call_command("migrate", verbosity=0)
    # As in production: no per-query logging outside the captured windows.
    settings.DEBUG = False

    def log(message: str) -> None:
        print(f"[bench.dlq {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    engine = "postgresql" if connection.vendor == "postgresql" else "sqlite"
    result: dict[str, Any] = {"engine": engine}
    if engine == "postgresql":
        result["changelist"] = changelist(sizes, log)
    else:
        result["changelist_note"] = (
            "Changelist timings skipped: they need PostgreSQL (estimated counts, loose index "
            "scans); this run has SQLite only."
        )
    log(f"bulk replay of {replay_n:,} dead letters")
    result["replay"] = bulk_replay(replay_n, f"{naming.prefix()}-dlq-replay")
    return result


def run(sizes: list[int], replay_n: int) -> dict[str, Any]:
    """Run :func:`measure` in a child process with the runner's environment.

    Raises:
        RuntimeError: The child failed.
    """
    args = ["--replay-n", str(replay_n)]
    for size in sizes:
        args += ["--rows", str(size)]
    return child.run("bench.dlq", args)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the child process: measure and print the JSON."""
    parser = argparse.ArgumentParser(prog="python -m bench.dlq")
    parser.add_argument("--rows", type=int, action="append", default=[])
    parser.add_argument("--replay-n", type=int, default=5000)
    args = parser.parse_args(argv)
    import django

    django.setup()
    print(json.dumps(measure(args.rows or [100_000], args.replay_n)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
