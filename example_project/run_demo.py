"""``make demo``: priority routing on real workers, from a fresh machine.

Starts a Redis of its own unless ``REDIS_URL`` is given, migrates the example project
(SQLite unless ``DATABASE_URL`` is given), starts one worker per priority queue, queues a
backlog of low-priority reports, then a few high-priority password resets, and prints when
and where each job ran. Every process it starts is stopped when it ends or on Ctrl-C.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
LOW_JOBS = 30
HIGH_JOBS = 5


def main() -> int:
    sys.path.insert(0, str(HERE))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "proj.settings")
    from devprocs.embedded import ensure_redis_url
    from devprocs.launcher import CeleryProcess

    redis_url, embedded = ensure_redis_url()
    print(f"broker: {redis_url}" + (" (embedded, started by the demo)" if embedded else ""))
    os.environ["CELERY_GUARD_LOG_LEVEL"] = "WARNING"

    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0)
    from celery_guard.conf import guard_settings
    from demo.models import JobRun
    from demo.tasks import build_report, send_password_reset
    from proj.celery import app

    JobRun.objects.all().delete()
    with app.connection_for_write() as conn:
        for queue in guard_settings.priority_queues.values():
            conn.default_channel.queue_purge(queue)

    workers: list[CeleryProcess] = []
    try:
        for level, queue in guard_settings.priority_queues.items():
            worker = CeleryProcess.worker(
                "proj", [queue], name=f"demo-{level}", hostname=f"{level}@demo", loglevel="WARNING"
            )
            print("starting:", " ".join(worker.command()[4:]), f"(log: {worker.log_path})")
            workers.append(worker)
            worker.launch()
        for worker in workers:
            worker.wait_ready()

        print(
            f"\nqueueing {LOW_JOBS} low-priority reports (0.2 s each), then "
            f"{HIGH_JOBS} high-priority password resets"
        )
        for i in range(LOW_JOBS):
            build_report.delay(i)
        time.sleep(0.5)
        for user_id in range(HIGH_JOBS):
            send_password_reset.delay(user_id)

        deadline = time.monotonic() + 120
        while JobRun.objects.count() < LOW_JOBS + HIGH_JOBS:
            if time.monotonic() > deadline:
                print("timed out waiting for the jobs", file=sys.stderr)
                return 1
            time.sleep(0.2)
        return _report(JobRun)
    finally:
        for worker in workers:
            worker.stop()
        if embedded:
            embedded.stop()
        print("stopped every process the demo started")


def _report(JobRun) -> int:
    runs = list(JobRun.objects.order_by("started_at"))
    t0 = runs[0].started_at
    print(f"\n{'start':>7}  {'queue':<8} {'worker':<14} job")
    for run in runs:
        print(
            f"{(run.started_at - t0).total_seconds():6.2f}s  {run.queue:<8} "
            f"{run.worker:<14} {run.label}"
        )
    high = [r for r in runs if r.priority == "high"]
    low = [r for r in runs if r.priority == "low"]
    last_low = max(r.started_at for r in low)
    overtook = sum(r.started_at < last_low for r in high)
    print(
        f"\n{overtook}/{len(high)} high-priority jobs started before the low backlog "
        f"drained (last low job started at {(last_low - t0).total_seconds():.2f}s)"
    )
    return 0 if overtook == len(high) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
