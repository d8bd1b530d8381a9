"""Delivery benchmarks: the outbox's cost, the schedule's throughput, the idle poller's cost.

``python -m bench.delivery --n N`` runs in a process of its own with the runner's environment
(its database and Redis broker) and prints one JSON object, like :mod:`bench.dlq`:

* ``outbox``: ``delay_on_commit`` of a guarded task with ``outbox=True`` against the same
  task without it, one transaction per call, published to a queue nobody consumes; the
  ratio is outbox / plain (calls per second, higher is better). Also with the Redis
  idempotency ledger (the row identity's claim in Redis), with the fast path off
  (``CELERY_GUARD_OUTBOX_FAST_PATH = False``: the request only writes the row), and the rate
  at which the poller then relays those rows (claim, publish, mark).
* ``schedule``: due messages moved per second by the Redis schedule (the Lua move), and
  published per second from the database schedule (claim, publish, mark), each next to the
  raw rate measured in the same run (``RPUSH`` one message per call; plain ``apply_async``).
* ``idle``: one poll of an idle poller (nothing due): wall time and the Redis commands and
  SQL queries it sends.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from bench import child, naming, stats


def _rate(count: int, seconds: float) -> float:
    return float(stats.rate(count, seconds))


def measure(n: int) -> dict[str, Any]:
    """Run the three benchmarks on this process's database and the run's Redis broker."""
    from celery import current_app
    from django.core.management import call_command
    from django.db import connection, transaction
    from django.test.utils import CaptureQueriesContext, override_settings

    from celery_guard import guarded_task
    from celery_guard.delivery import schedule, services
    from celery_guard.delivery.models import OutboxMessage
    from celery_guard.delivery.poller import Poller

    call_command("migrate", verbosity=0)
    app = current_app._get_current_object()
    queue = f"{naming.prefix()}-delivery"
    prefix = f"{naming.prefix()}:schedule:"

    def noop(ident: int) -> None: ...

    with_outbox = guarded_task(name="bench.delivery.outbox", outbox=True)(noop)
    without = guarded_task(name="bench.delivery.plain")(noop)
    result: dict[str, Any] = {"n": n, "engine": connection.vendor}

    def commits(task: Any) -> float:
        started = time.perf_counter()
        for i in range(n):
            with transaction.atomic():
                task.apply_async_on_commit((i,), queue=queue)
        return _rate(n, time.perf_counter() - started)

    def drain() -> float:
        """Claim and publish every due row as the poller does; rows published per second."""
        started = time.perf_counter()
        published = 0
        while True:
            _, rows = services.claim_due(500, 30)
            if not rows:
                break
            published += services.publish_claimed(app, rows)
        return _rate(published, time.perf_counter() - started)

    with override_settings(CELERY_GUARD_SCHEDULE_REDIS_PREFIX=prefix):
        plain_rate = commits(without)
        outbox_rate = commits(with_outbox)
        # The same with the Redis idempotency ledger: the row's identity claim and its
        # confirmation are Redis commands instead of two database commits.
        with override_settings(CELERY_GUARD_IDEMPOTENCY_BACKEND="redis"):
            redis_ledger_rate = commits(with_outbox)
        # Relay only (no fast path): the request writes the row; the poller publishes.
        OutboxMessage.objects.all().delete()
        with override_settings(CELERY_GUARD_OUTBOX_FAST_PATH=False):
            relay_only_rate = commits(with_outbox)
        relayed_rate = drain()
        OutboxMessage.objects.all().delete()
        result["outbox"] = {
            "plain_per_s": plain_rate,
            "outbox_per_s": outbox_rate,
            "ratio": stats.ratio(outbox_rate, plain_rate),
            "redis_ledger_per_s": redis_ledger_rate,
            "redis_ledger_ratio": stats.ratio(redis_ledger_rate, plain_rate),
            "relay_only_per_s": relay_only_rate,
            "relay_only_ratio": stats.ratio(relay_only_rate, plain_rate),
            "relayed_per_s": relayed_rate,
        }
        # The Redis schedule: n messages due now, moved in batches by the Lua script.
        redis_schedule = schedule.RedisSchedule(app)
        due = time.time() + 0.5
        for i in range(n):
            redis_schedule.hold(
                due, lambda p, i=i: without.apply_async((i,), queue=queue, producer=p)
            )
        time.sleep(max(0.0, due - time.time()) + 0.05)
        started = time.perf_counter()
        while redis_schedule.size():
            redis_schedule.move_due("bench", 500)
        moved_rate = _rate(n, time.perf_counter() - started)
        body = "x" * 600  # about the size of a small task message
        client = redis_schedule.client
        started = time.perf_counter()
        for _ in range(n):
            client.rpush(f"{queue}-raw", body)
        raw_redis = _rate(n, time.perf_counter() - started)
        client.delete(f"{queue}-raw", queue, redis_schedule.lease_key)
        # The database schedule: n rows due now, claimed and published through Celery.
        with override_settings(CELERY_GUARD_SCHEDULE="database"):
            for i in range(n):
                services.publish_at(
                    app,
                    time.time() - 1,
                    lambda p: None,
                    {
                        "task_name": without.name,
                        "task_id": f"b{i}",
                        "args": [i],
                        "kwargs": {},
                        "options": {"queue": queue},
                        "headers": {},
                        "queue": queue,
                        "attempt": 0,
                    },
                )
            db_rate = drain()
        started = time.perf_counter()
        for i in range(n):
            without.apply_async((i,), queue=queue)
        raw_publish = _rate(n, time.perf_counter() - started)
        client.delete(queue)
        OutboxMessage.objects.all().delete()
        result["schedule"] = {
            "redis_moved_per_s": moved_rate,
            "raw_redis_rpush_per_s": raw_redis,
            "database_published_per_s": db_rate,
            "raw_celery_publish_per_s": raw_publish,
        }
        # The idle poller: nothing due; one poll per second in production.
        idle: dict[str, Any] = {}
        for backend in ("redis", "database"):
            with override_settings(CELERY_GUARD_SCHEDULE=backend):
                poller = Poller(app, outbox=False)
                poller.tick()
                sent = [0]
                if poller.redis is not None:
                    execute = poller.redis.client.execute_command

                    def counted(
                        *args: Any, _sent: list[int] = sent, _run: Any = execute, **kwargs: Any
                    ) -> Any:
                        _sent[0] += 1
                        return _run(*args, **kwargs)

                    poller.redis.client.execute_command = counted
                ticks = 200
                with CaptureQueriesContext(connection) as queries:
                    started = time.perf_counter()
                    for _ in range(ticks):
                        poller.tick()
                    elapsed = time.perf_counter() - started
                poller.release()
                idle[backend] = {
                    "ms_per_poll": elapsed / ticks * 1000,
                    "redis_commands_per_poll": sent[0] / ticks,
                    "sql_queries_per_poll": len(queries) / ticks,
                }
        result["idle"] = idle
    return result


def run(n: int) -> dict[str, Any]:
    """Run :func:`measure` in a child process with the runner's environment.

    Raises:
        RuntimeError: The child failed.
    """
    return child.run("bench.delivery", ["--n", str(n)])


def table(delivery: dict[str, Any]) -> str:
    """The Markdown section of the results."""
    fmt = "{:,.0f}".format
    outbox, sched, idle = delivery["outbox"], delivery["schedule"], delivery["idle"]
    lines = [
        f"{delivery['n']:,} calls or messages per measurement ({delivery['engine']}).",
        "",
        "| measurement | per second | compared with | per second | ratio |",
        "|---|---|---|---|---|",
        f"| `delay_on_commit`, `outbox=True` | {fmt(outbox['outbox_per_s'])} | plain "
        f"`delay_on_commit` | {fmt(outbox['plain_per_s'])} | {outbox['ratio'] or 0:.2f} |",
        f"| `delay_on_commit`, `outbox=True`, Redis ledger | "
        f"{fmt(outbox['redis_ledger_per_s'])} | plain `delay_on_commit` | "
        f"{fmt(outbox['plain_per_s'])} | {outbox['redis_ledger_ratio'] or 0:.2f} |",
        f"| `delay_on_commit`, `outbox=True`, fast path off | "
        f"{fmt(outbox['relay_only_per_s'])} | plain `delay_on_commit` | "
        f"{fmt(outbox['plain_per_s'])} | {outbox['relay_only_ratio'] or 0:.2f} |",
        f"| poller: outbox rows relayed | {fmt(outbox['relayed_per_s'])} | plain `apply_async` | "
        f"{fmt(sched['raw_celery_publish_per_s'])} | "
        f"{outbox['relayed_per_s'] / sched['raw_celery_publish_per_s']:.2f} |",
        f"| Redis schedule: due messages moved | {fmt(sched['redis_moved_per_s'])} | raw "
        f"`RPUSH`, one per call | {fmt(sched['raw_redis_rpush_per_s'])} | "
        f"{sched['redis_moved_per_s'] / sched['raw_redis_rpush_per_s']:.2f} |",
        f"| database schedule: due rows published | {fmt(sched['database_published_per_s'])} "
        f"| plain `apply_async` | {fmt(sched['raw_celery_publish_per_s'])} | "
        f"{sched['database_published_per_s'] / sched['raw_celery_publish_per_s']:.2f} |",
        "",
        "| idle poller (nothing due), per poll | ms | Redis commands | SQL queries |",
        "|---|---|---|---|",
    ]
    for backend, cost in idle.items():
        lines.append(
            f"| {backend} schedule | {cost['ms_per_poll']:.2f} | "
            f"{cost['redis_commands_per_poll']:.1f} | {cost['sql_queries_per_poll']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the child process: measure and print the JSON."""
    parser = argparse.ArgumentParser(prog="python -m bench.delivery")
    parser.add_argument("--n", type=int, default=1000)
    args = parser.parse_args(argv)
    import django

    django.setup()
    print(json.dumps(measure(args.n)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
