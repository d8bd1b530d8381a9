"""CPU per enqueue: ``task.apply_async`` of each variant, in user CPU seconds, not wall time.

``python -m bench.cpu [--n N] [--repeat R] [--variant NAME]... [--profile NAME]`` publishes N
no-op tasks per variant against the real Redis broker (no worker), R times interleaved, and
prints the best user CPU time per enqueue of each variant and its ratio to plain Celery. User
CPU (``getrusage``) leaves out the time spent waiting for Redis and the kernel's socket work,
and barely moves when other processes load the machine, so it isolates what the guard itself
costs on the producer; ``make bench`` gives the wall-clock figures. ``--profile NAME`` also
prints the guard's functions from a cProfile of that variant.

For instruction counts that repeat exactly, run it under ``valgrind --tool=callgrind`` with
``--n 0`` and with ``--n N --repeat 1`` and divide the difference by N times the variants.

The database-ledger variants need the bench's migrated database (``make bench`` runs them).
"""

from __future__ import annotations

import argparse
import cProfile
import itertools
import os
import pstats
import resource
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_VARIANTS = ("plain", "guarded-routing", "guarded-idem-redis")


def _user_cpu() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_utime


def main(argv: list[str] | None = None) -> int:
    """Measure and print one line per variant."""
    parser = argparse.ArgumentParser(prog="python -m bench.cpu", description=__doc__)
    parser.add_argument("--n", type=int, default=2000, help="enqueues per variant and repeat")
    parser.add_argument("--repeat", type=int, default=5, help="interleaved repeats (best kept)")
    parser.add_argument("--variant", action="append", metavar="NAME", help="variant(s) to time")
    parser.add_argument("--profile", metavar="NAME", help="print the guard's share of NAME")
    args = parser.parse_args(argv)
    os.environ.setdefault("CG_BENCH_RUN_ID", f"cpu{os.getpid()}")
    os.environ.setdefault(
        "CG_BENCH_BROKER_URL", os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.settings")
    sys.path[:0] = [str(ROOT), str(ROOT / "example_project")]
    import django

    django.setup()
    import redis

    from bench import cases, naming
    from bench.benchapp import tasks  # noqa: F401  (registers the variants)

    names = args.variant or list(DEFAULT_VARIANTS)
    by_name = {v.name: v for v in cases.variants()}
    idents = itertools.count(int(time.time() * 1e6))

    def publish(name: str, n: int) -> None:
        variant = by_name[name]
        task = variant.tasks["noop"]
        for _ in range(n):
            ident = next(idents)
            variant.send(task, (ident,), ident)

    client: Any = redis.Redis.from_url(os.environ["CG_BENCH_BROKER_URL"])
    best: dict[str, float] = {}
    profile = cProfile.Profile()
    try:
        for name in names:
            publish(name, 50)  # connect and warm up, not timed
        for _ in range(args.repeat):
            for name in names:
                start = _user_cpu()
                if name == args.profile:
                    profile.enable()
                publish(name, args.n)
                profile.disable()
                per_call = (_user_cpu() - start) / max(args.n, 1)
                best[name] = min(best.get(name, per_call), per_call)
    finally:
        keys = list(client.scan_iter(match=f"{naming.prefix()}*", count=1000))
        if keys:
            client.delete(*keys)
    base = best.get("plain")
    for name in names:
        ratio = f"  {base / best[name]:.2f}x plain" if base and best[name] else ""
        print(f"{name:24s} {best[name] * 1e6:8.1f} us user CPU per enqueue{ratio}")
    if args.profile:
        pstats.Stats(profile).sort_stats("cumulative").print_stats("celery_guard", 40)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
