"""Micro-benchmarks off the task path: idempotency ledger decisions and beat lease operations.

``python -m bench.micro --n N [--redis]`` runs in a process of its own, set up by the runner
with the database to measure (``DATABASE_URL`` or ``SQLITE_PATH``), and prints one JSON
object. A process per database, because ``celery_guard.beat.lease`` works on the default database
alias: the SQLite figures come from a process whose default database is a SQLite file.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from bench import child, naming, stats

#: django-celery-beat's ``DatabaseScheduler`` ticks at least this often (seconds) when
#: ``beat_max_loop_interval`` is not set; the guarded beat renews its lease on that tick.
BEAT_MAX_INTERVAL = 5.0


def _timed(calls: list[Callable[[], Any]]) -> list[float]:
    times = []
    for call in calls:
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return times


def _summary(times: list[float]) -> dict[str, Any]:
    return {
        "p50_us": stats.percentile(times, 50) * 1e6,
        "p99_us": stats.percentile(times, 99) * 1e6,
        "n": len(times),
    }


def ledger_decisions(store: Any, n: int, tag: str) -> dict[str, Any]:
    """Time ``n`` first claims of fresh keys, then ``n`` claims of the same keys again.

    The second claim, from another task id with the same arguments, is the enqueue-time
    duplicate decision: the ledger answers "duplicate" and nothing would be published.
    """
    keys = [f"bench-micro:{tag}:{uuid.uuid4().hex}" for _ in range(n)]
    for key in keys[:20]:  # connect and warm up, not timed
        store.claim(key + ":warm", task_name="bench.micro", task_id="w", fingerprint="f", window=60)

    def claim(key: str, task_id: str) -> Callable[[], Any]:
        def call() -> None:
            outcome = store.claim(
                key, task_name="bench.micro", task_id=task_id, fingerprint="f", window=600
            ).outcome
            expected = "claimed" if task_id == "first" else "duplicate"
            if outcome != expected:
                raise RuntimeError(f"claim of {key}: {outcome}, expected {expected}")

        return call

    first = _timed([claim(key, "first") for key in keys])
    duplicate = _timed([claim(key, "second") for key in keys])
    return {"first_claim": _summary(first), "duplicate": _summary(duplicate)}


def lease_operations(n: int) -> dict[str, Any]:
    """Time lease acquisitions (a takeover of an expired lease) and renewals by the holder,
    and one beat tick's lease step when a renewal is due (the scheduler's real code path)."""
    from django.utils import timezone

    from celery_guard.beat import lease
    from celery_guard.conf import guard_settings
    from celery_guard.models import BeatLease

    name = f"bench-micro-{uuid.uuid4().hex[:12]}"
    ttl = guard_settings.beat_lease_seconds
    holders = [lease.make_identity(), lease.make_identity()]
    try:
        lease.acquire_or_renew(name, holders[0], ttl)  # first acquisition inserts the row
        acquire = []
        expired = timezone.now() - timedelta(seconds=60)
        for i in range(n):
            previous, me = holders[i % 2], holders[(i + 1) % 2]
            # Expired a minute ago (not timed): the next beat takes over.
            BeatLease.objects.filter(name=name, holder=previous).update(expires_at=expired)
            t = time.perf_counter()
            record = lease.acquire_or_renew(name, me, ttl)
            acquire.append(time.perf_counter() - t)
            if not record.held:
                raise RuntimeError("lease acquisition failed")
        holder = holders[n % 2]
        renew = _timed([lambda: lease.acquire_or_renew(name, holder, ttl)] * n)
        beat_lease = lease.Lease(name, ttl, renew_every=BEAT_MAX_INTERVAL)
        beat_lease.identity = holder
        beat_lease.step()  # takes over our own lease: the "acquired" log line, not timed
        steps = []
        for _ in range(n):
            beat_lease.renew_at = 0.0  # renewal due, as on the tick after renew_every
            t = time.perf_counter()
            beat_lease.step()
            steps.append(time.perf_counter() - t)
    finally:
        lease.release(name, holders[0])
        BeatLease.objects.filter(name=name).delete()
    step = _summary(steps)
    return {
        "acquire": _summary(acquire),
        "renew": _summary(renew),
        "tick_step": step,
        "ttl_s": ttl,
        "renew_every_s": beat_lease.renew_every,
        "loop_share_p50": step["p50_us"] / 1e6 / beat_lease.renew_every,
        "loop_share_p99": step["p99_us"] / 1e6 / beat_lease.renew_every,
    }


def measure(n: int, with_redis: bool) -> dict[str, Any]:
    """Run every micro-benchmark on this process's default database (and Redis)."""
    from django.core.management import call_command
    from django.db import connection

    from celery_guard.conf import guard_settings
    from celery_guard.idempotency import ledger

    call_command("migrate", verbosity=0)
    engine = "postgresql" if connection.vendor == "postgresql" else "sqlite"
    result: dict[str, Any] = {
        "engine": engine,
        "ledger": ledger_decisions(ledger.DatabaseLedger(), n, engine),
        "lease": lease_operations(n),
    }
    if with_redis:
        store = ledger.RedisLedger(ledger.redis_url(), guard_settings.idempotency_redis_prefix)
        result["redis_ledger"] = ledger_decisions(store, n, "redis")
    return result


def run(n: int, *, sqlite_path: str | None, with_redis: bool) -> dict[str, Any]:
    """Run :func:`measure` in a child process (the runner's environment, or a SQLite file).

    Raises:
        RuntimeError: The child failed.
    """
    env = dict(os.environ)
    if sqlite_path is not None:
        env.pop("DATABASE_URL", None)
        env["SQLITE_PATH"] = sqlite_path
    env.pop(naming.LEDGER_SQLITE_ENV, None)
    return child.run("bench.micro", ["--n", str(n), *(["--redis"] if with_redis else [])], env)


def run_all(n: int, engine: str) -> dict[str, Any]:
    """Micro-benchmarks on the run's database and Redis, and on SQLite when that is PostgreSQL.

    Returns:
        ``{"postgresql": {...}, "sqlite": {...}}`` (the engines measured), each with
        ``ledger`` and ``lease`` figures; the first also with ``redis_ledger``.
    """
    results = {engine: run(n, sqlite_path=None, with_redis=True)}
    if engine != "sqlite":
        path = str(Path(tempfile.gettempdir()) / f"cgbench-micro-{uuid.uuid4().hex[:8]}.sqlite3")
        try:
            results["sqlite"] = run(n, sqlite_path=path, with_redis=False)
        finally:
            for suffix in ("", "-wal", "-shm"):
                Path(path + suffix).unlink(missing_ok=True)
    return results


def main(argv: list[str] | None = None) -> int:
    """Entry point of the child process: measure and print the JSON."""
    parser = argparse.ArgumentParser(prog="python -m bench.micro")
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--redis", action="store_true")
    return child.main(parser, argv, lambda args: measure(args.n, args.redis))


if __name__ == "__main__":
    sys.exit(main())
