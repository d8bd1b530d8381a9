"""The worker-side cost of one delivery, per task, in one process (issue 12's hot path).

``python -m bench.hotpath [--n N] [--repeat R] [--variant NAME ...] [--profile NAME]
[--sleep-ms MS]``

For each variant's no-op task (or a task that sleeps ``--sleep-ms``, as the 10 ms drain's),
N messages are published the producer's way (the guard's ``apply_async``: payload check,
header, router, a keyed task's claim), captured before they reach the broker, then
delivered through the worker's own code, in this process:

* *main*: the task's ``Request`` class built from the kombu message, as the worker's main
  process does for every message it receives (the body decoded, the request dict made);
* *child*: Celery's ``fast_trace_task`` on that request, as a prefork pool child runs it:
  the task's tracer with every ``task_prerun``/``task_postrun`` receiver (Celery's Django
  fixup, the guard's), the guard pipeline and the body.

Only the delivery is timed: publishing is not. A keyed task's ledger round trips (start and
finish) are in *child*. Timings are per task, the median of the repetitions, in thread CPU
microseconds (what the shared machine's load changes least) next to wall-clock ones.

``--profile NAME`` prints a cProfile of one repetition of that variant's *child* phase
instead. ``--callgrind NAME`` runs only that variant's deliveries inside
``functools.reduce`` (a C function): run the module under
``valgrind --tool=callgrind --collect-atstart=no --toggle-collect=functools_reduce`` and the
instruction count of the deliveries alone, divided by N, is the cost per task.

Needs the example project's database (``DATABASE_URL``, migrated) and Redis (``REDIS_URL``).
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import json
import os
import pstats
import socket
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

#: Variants measured: name -> (declaration kind, title).
VARIANTS = {
    "plain": "plain Celery @shared_task",
    "routing": "guarded: routing only",
    "redis-key": "guarded: idempotency key, Redis ledger",
    "limits": "guarded: routing + a limit that never binds, Redis store",
}

#: Seconds the body sleeps (``--sleep-ms``; 0: a no-op).
SLEEP = 0.0

Job = tuple[str, str, dict[str, Any], Any, Any, Any]


def _environment() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.settings")
    os.environ.setdefault("CG_BENCH_RUN_ID", f"hotpath-{os.getpid()}")
    os.environ.setdefault(
        "CG_BENCH_BROKER_URL", os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    )


def noop(ident: int) -> None:
    """Do nothing (or sleep ``SLEEP``): the deliveries measure the framework alone."""
    if SLEEP:
        time.sleep(SLEEP)


class _Worker:
    """What ``worker_init`` receivers read of the worker (its app, pool and name)."""

    pool_cls = "celery.concurrency.prefork:TaskPool"

    def __init__(self, app: Any, hostname: str) -> None:
        self.app = app
        self.hostname = hostname


class Harness:
    """The app as a worker has it (worker_init sent, fast tracing on) and the variants' tasks."""

    def __init__(self) -> None:
        import django

        django.setup()
        from celery import shared_task, signals
        from celery.app import trace
        from django.test.utils import override_settings

        from bench import naming
        from bench.cases.baseline import PLAIN_OPTIONS
        from celery_guard import guarded_task
        from proj.celery import app

        # The Redis ledger for the keyed variant (its tasks are the only ones with a key).
        # Periodic work (the task policies read every 2 s, the rollups written every 10 s)
        # is left out: amortised over the thousands of tasks of those seconds it costs little
        # per task, but under valgrind, 50 times slower, it would run within a few hundred.
        override_settings(
            CELERY_GUARD_IDEMPOTENCY_BACKEND="redis",
            CELERY_GUARD_POLICY_REFRESH=3600,
            CELERY_GUARD_ROLLUP_FLUSH_SECONDS=3600,
        ).enable()
        self.app = app
        self.hostname = f"hotpath@{socket.gethostname()}"
        queue = f"{naming.prefix()}-plain"
        self.tasks: dict[str, Any] = {
            "plain": shared_task(name="hotpath.plain", queue=queue, **PLAIN_OPTIONS)(noop),
            "routing": guarded_task(name="hotpath.routing", priority="default", ignore_result=True)(
                noop
            ),
            "redis-key": guarded_task(
                name="hotpath.redis_key",
                priority="default",
                idempotency_key="hotpath:{ident}",
                ignore_result=True,
            )(noop),
            "limits": guarded_task(
                name="hotpath.limits",
                priority="default",
                concurrency=10000,
                rate="1000000/h",
                ignore_result=True,
            )(noop),
        }
        app.finalize()
        self.tasks = {name: app.tasks[task.name] for name, task in self.tasks.items()}
        # What a prefork worker does before its first task: worker_init (the Django fixup
        # connects its task_prerun/task_postrun receivers, the guard gives the reuse
        # default), then the pool child's tracers.
        signals.worker_init.send(sender=_Worker(app, self.hostname))
        trace.setup_worker_optimizations(app, self.hostname)
        # A pool child's initializer (celery.concurrency.prefork.process_initializer).
        for name, task in app.tasks.items():
            task.__trace__ = trace.build_tracer(name, task, app.loader, self.hostname, app=app)
        signals.worker_process_init.send(sender=self.hostname)
        self._captured: list[tuple[str, Any, dict[str, Any]]] = []
        app.amqp.send_task_message = self._capture
        self._ident = 0

    def _capture(self, producer: Any, name: str, message: Any, **options: Any) -> None:
        self._captured.append((name, message, options))

    def publish(self, variant: str, n: int) -> list[Any]:
        """Publish ``n`` calls of ``variant``'s task; return the kombu messages a worker gets."""
        from kombu.message import Message
        from kombu.serialization import dumps

        task = self.tasks[variant]
        self._captured.clear()
        for _ in range(n):
            self._ident += 1
            task.apply_async((self._ident,))
        messages = []
        for _name, message, options in self._captured:
            headers, properties, body, _sent = message
            headers = {**headers, **(options.get("headers") or {})}
            content_type, encoding, data = dumps(body, serializer="json")  # type: ignore[no-untyped-call]
            queue = options.get("queue")
            routing_key = options.get("routing_key") or getattr(queue, "name", queue)
            messages.append(
                Message(  # type: ignore[no-untyped-call]
                    body=data,
                    content_type=content_type,
                    content_encoding=encoding,
                    headers=headers,
                    properties={**properties, "priority": options.get("priority")},
                    delivery_info={
                        "exchange": "",
                        "routing_key": routing_key,
                        "redelivered": False,
                    },
                    channel=None,
                )
            )
        return messages

    def receive(self, variant: str, messages: Sequence[Any]) -> list[Job]:
        """The main process's part: the task's ``Request`` of each message."""
        from celery.utils.imports import symbol_by_name

        task = self.tasks[variant]
        request_cls = symbol_by_name(task.Request)
        jobs: list[Job] = []
        for message in messages:
            req = request_cls(message, app=self.app, task=task, hostname=self.hostname)
            jobs.append(
                (
                    req._type,
                    req.id,
                    req._request_dict,
                    req._body,
                    req._content_type,
                    req._content_encoding,
                )
            )
        return jobs

    def execute(self, jobs: Sequence[Job]) -> None:
        """The pool child's part: ``fast_trace_task`` on each request.

        Raises:
            RuntimeError: A delivery did not succeed.
        """
        from celery.app.trace import fast_trace_task

        hostname = self.hostname
        for name, task_id, request, body, content_type, encoding in jobs:
            (failed, _info, _runtime) = fast_trace_task(
                name, task_id, request, body, content_type, encoding, hostname=hostname
            )
            if failed:
                raise RuntimeError(f"{name}[{task_id}] did not succeed: {_info}")

    def cleanup(self) -> None:
        """Delete this run's ledger keys."""
        import redis

        from bench import naming

        client = redis.Redis.from_url(os.environ["CG_BENCH_BROKER_URL"])
        for key in client.scan_iter(match=f"{naming.prefix()}:*", count=1000):
            client.delete(key)


def _timed(call: Callable[[], Any]) -> tuple[float, float]:
    cpu, wall = time.thread_time(), time.perf_counter()
    call()
    return time.thread_time() - cpu, time.perf_counter() - wall


def _receive_into(harness: Harness, variant: str, messages: list[Any], jobs: list[Job]) -> None:
    jobs.extend(harness.receive(variant, messages))


def measure(harness: Harness, variants: Sequence[str], n: int, repeat: int) -> dict[str, Any]:
    """Per-task microseconds of each variant's phases, the median of ``repeat`` repetitions."""
    for variant in variants:  # warm up: tracers built, connections open, caches filled
        harness.execute(harness.receive(variant, harness.publish(variant, 50)))
    figures: dict[str, dict[str, list[float]]] = {
        v: {"main_cpu": [], "main_wall": [], "child_cpu": [], "child_wall": []} for v in variants
    }
    for _ in range(repeat):
        for variant in variants:  # interleaved: A B C A B C ...
            messages = harness.publish(variant, n)
            jobs: list[Job] = []
            cpu, wall = _timed(functools.partial(_receive_into, harness, variant, messages, jobs))
            figures[variant]["main_cpu"].append(cpu / n * 1e6)
            figures[variant]["main_wall"].append(wall / n * 1e6)
            cpu, wall = _timed(functools.partial(harness.execute, jobs))
            figures[variant]["child_cpu"].append(cpu / n * 1e6)
            figures[variant]["child_wall"].append(wall / n * 1e6)
    return {
        variant: {metric: round(statistics.median(values), 2) for metric, values in f.items()}
        for variant, f in figures.items()
    }


def profile(harness: Harness, variant: str, n: int) -> None:
    """Print a cProfile of ``n`` deliveries of ``variant`` (the child phase)."""
    harness.execute(harness.receive(variant, harness.publish(variant, 50)))
    jobs = harness.receive(variant, harness.publish(variant, n))
    profiler = cProfile.Profile()
    profiler.runcall(harness.execute, jobs)
    stats = pstats.Stats(profiler, stream=sys.stderr)
    stats.sort_stats("tottime").print_stats(45)
    stats.sort_stats("cumulative").print_stats(60)


def callgrind(harness: Harness, variant: str, n: int) -> None:
    """Run ``n`` deliveries of ``variant`` inside ``functools.reduce`` (see the module doc)."""
    harness.execute(harness.receive(variant, harness.publish(variant, 50)))
    jobs = harness.receive(variant, harness.publish(variant, n))
    functools.reduce(lambda _, job: harness.execute([job]), jobs, None)


def main(argv: list[str] | None = None) -> int:
    """Entry point: print the per-task figures as JSON (or a profile)."""
    parser = argparse.ArgumentParser(prog="python -m bench.hotpath")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--variant", action="append", choices=list(VARIANTS))
    parser.add_argument("--profile", choices=list(VARIANTS))
    parser.add_argument("--callgrind", choices=list(VARIANTS))
    parser.add_argument("--sleep-ms", type=float, default=0.0, help="the body sleeps this long")
    args = parser.parse_args(argv)
    global SLEEP
    SLEEP = args.sleep_ms / 1000
    _environment()
    harness = Harness()
    try:
        if args.profile:
            profile(harness, args.profile, args.n)
        elif args.callgrind:
            callgrind(harness, args.callgrind, args.n)
        else:
            result = measure(harness, args.variant or list(VARIANTS), args.n, args.repeat)
            print(json.dumps({"n": args.n, "repeat": args.repeat, "per_task_us": result}))
    finally:
        harness.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
