"""``python -m bench``: run the benchmark, write the JSON and print the Markdown table.

Options: ``--full`` (longer run), ``--write-docs`` (also fill the results section of
docs/benchmarks.md), ``--only NAME`` (compare only these guarded variants), ``--only-dlq``
(only the dead-letter section), ``--only-runs`` (only the bulk-runs section), ``--dlq-rows N``
(time the changelist at these sizes), ``--sqlite`` (use SQLite even when PostgreSQL is
available), ``--out DIR``.

``python -m bench seed-dead-letters COUNT [--batch N]`` inserts fake dead letters into the
example project's database (``DATABASE_URL``, or its SQLite file; another project's with
``DJANGO_SETTINGS_MODULE``), as the changelist benchmark does.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DOCS = ROOT / "docs" / "benchmarks.md"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--full", action="store_true", help="the full, longer run")
    parser.add_argument("--write-docs", action="store_true", help="update docs/benchmarks.md")
    parser.add_argument("--only", action="append", metavar="NAME", help="guarded variant(s)")
    parser.add_argument(
        "--only-dlq",
        action="store_true",
        help="only the dead-letter section (no variants, worker or micro-benchmarks)",
    )
    parser.add_argument(
        "--only-runs",
        action="store_true",
        help="only the bulk-runs section (no variants, worker or micro-benchmarks)",
    )
    parser.add_argument(
        "--dlq-rows",
        action="append",
        type=int,
        metavar="N",
        help="dead letters to time the changelist at, instead of the mode's sizes (repeatable)",
    )
    parser.add_argument(
        "--only-variants",
        action="store_true",
        help="only the variants' phases (enqueue, drains, paced, limits' round trips)",
    )
    parser.add_argument("--sqlite", action="store_true", help="use SQLite, not PostgreSQL")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory of the JSON")
    args = parser.parse_args(argv)
    if sum((args.only_dlq, args.only_runs, args.only_variants)) > 1:
        parser.error("--only-dlq, --only-runs and --only-variants each run one part: pick one")
    partial = "--only-dlq" if args.only_dlq else "--only-runs" if args.only_runs else None
    if args.only_variants and args.write_docs:
        parser.error("--write-docs needs the whole run, not --only-variants")
    if partial and args.only:
        parser.error(f"--only picks variants, which {partial} does not run")
    if partial and args.write_docs:
        # The docs' results section is one whole run: a partial one would replace it.
        parser.error(f"--write-docs needs the whole run, not {partial}")
    if args.dlq_rows and min(args.dlq_rows) < 1:
        parser.error("--dlq-rows must be positive")
    return args


def _terminate(signum: int, frame: Any) -> None:
    # Turn SIGTERM into an exception so every `finally` stops what the run started.
    raise SystemExit(128 + signum)


def seed_dead_letters(argv: list[str]) -> int:
    """``python -m bench seed-dead-letters COUNT [--batch N]``: insert fake dead letters."""
    parser = argparse.ArgumentParser(prog="python -m bench seed-dead-letters")
    parser.add_argument("count", type=int, help="dead letters to insert")
    parser.add_argument(
        "--batch",
        type=int,
        default=5000,
        help="rows per bulk_create (PostgreSQL with psycopg 3 writes them all with one COPY)",
    )
    args = parser.parse_args(argv)
    if args.count < 1 or args.batch < 1:
        parser.error("COUNT and --batch must be at least 1")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "proj.settings")
    import django

    django.setup()
    from bench.seed import seed

    started = time.monotonic()
    written = seed(args.count, batch=args.batch)
    print(f"seeded {written} dead letter(s) in {time.monotonic() - started:.1f}s")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or the ``seed-dead-letters`` subcommand); return the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    sys.path[:0] = [str(ROOT), str(ROOT / "example_project")]
    if argv[:1] == ["seed-dead-letters"]:
        return seed_dead_letters(argv[1:])
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    # A shell starts background jobs with SIGINT ignored; Ctrl-C must still clean up.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    from bench import dbcount, naming, report
    from bench.runner import FULL, QUICK, Runner, WorkerConfig, progress
    from bench.services import Services, forget_keys

    config = FULL if args.full else QUICK
    if args.dlq_rows:
        config = dataclasses.replace(config, dlq_rows=tuple(sorted(set(args.dlq_rows))))
    run_id = uuid.uuid4().hex[:8]
    os.environ[naming.RUN_ID_ENV] = run_id
    started = dt.datetime.now(dt.timezone.utc)
    t0 = time.monotonic()
    services = Services(run_id, log=progress)
    shared_redis = os.environ.get("REDIS_URL")
    try:
        broker_url, redis_origin = services.redis()
        database = services.database(sqlite=args.sqlite)
        os.environ.update(
            DJANGO_SETTINGS_MODULE="bench.settings",
            CG_BENCH_BROKER_URL=broker_url,
            CELERY_BROKER_URL=broker_url,
        )
        # The workers count their database commits into files there (bench/dbcount.py).
        os.environ[dbcount.ENV] = tempfile.mkdtemp(prefix="cgbench-db-")
        if database.url:
            os.environ["DATABASE_URL"] = database.url
            # The database ledger on SQLite is compared too (bench/cases/idempotency.py).
            os.environ[naming.LEDGER_SQLITE_ENV] = services.sqlite_file("ledger")
        else:
            os.environ.pop("DATABASE_URL", None)
            os.environ["SQLITE_PATH"] = str(database.sqlite_path)

        import django

        django.setup()
        from django.core.management import call_command

        import bench.benchapp.tasks  # noqa: F401  (registers every case's tasks)
        from bench import (
            cases,
            delivery,
            dlq,
            fingerprint,
            limit_trips,
            micro,
            observability,
            runs,
        )
        from bench.worker import BenchWorker
        from proj.celery import app

        variants = [] if args.only_dlq or args.only_runs else cases.variants(args.only)
        if any(v.needs_database for v in variants):
            progress("migrating the bench database")
            call_command("migrate", verbosity=0)
            if naming.LEDGER_SQLITE_ENV in os.environ:
                call_command("migrate", database=naming.LEDGER_SQLITE_ALIAS, verbosity=0)
        runner = Runner(
            config,
            app,
            variants,
            broker_url=broker_url,
            prefix=naming.prefix(),
            database=database,
            log=progress,
        )
        fp = fingerprint.collect(runner.redis, database)

        def start_worker(config: WorkerConfig) -> BenchWorker:
            worker = BenchWorker(app, naming.prefix(), name=config.name, env=config.env)
            try:
                worker.start()
            except BaseException:
                worker.stop()
                raise
            services.record(
                f"celery worker, {config.title} (prefork, 2 processes)", worker.pid, worker.stop
            )
            return worker

        measured: dict[str, Any]
        if args.only_dlq or args.only_runs:
            section = "dead letters" if args.only_dlq else "bulk runs"
            progress(f"run {run_id}: {config.mode} mode, {section} only")
            measured = {"config": dataclasses.asdict(config)}
        else:
            progress(f"run {run_id}: {config.mode} mode, variants {[v.name for v in variants]}")
            measured = runner.run(start_worker)
            if any(v.name in limit_trips.STORES for v in variants):
                progress("limits: round trips per task, counted in process")
                measured["limit_trips"] = limit_trips.run(variants, config.limit_trips_n)
        if not (args.only_dlq or args.only_runs or args.only_variants):
            progress("micro-benchmarks: ledger decisions and beat lease operations")
            measured["micro"] = micro.run_all(config.micro_n, database.engine)
            progress("observability: the events' cost per task, in process")
            measured["observability"] = observability.run(config.observability_n, config.reps)
        if not (args.only_runs or args.only_variants):
            progress("dead letters: changelist timings and bulk replay")
            measured["dlq"] = dlq.run(list(config.dlq_rows), config.dlq_replay_n)
        if not (args.only_dlq or args.only_runs or args.only_variants):
            progress("delivery: outbox, schedule throughput, idle poller")
            measured["delivery"] = delivery.run(config.delivery_n)
        if not (args.only_dlq or args.only_variants):
            progress("bulk runs: start_run, drain against a group, memory")
            measured["runs"] = runs.run(
                config.runs_n, config.runs_drain_n, config.reps, config.runs_memory_n
            )
        fp["load_end"] = fingerprint.load_average()
        results = {
            "schema": 1,
            "run_id": run_id,
            "started_at": started.isoformat(timespec="seconds"),
            "duration_s": time.monotonic() - t0,
            "fingerprint": fp,
            "services": {"redis": redis_origin, "database": database.origin},
            "notes": database.notes,
            **measured,
        }
    finally:
        try:
            from django.db import connections

            connections.close_all()
        except Exception:  # Django may not be set up yet
            pass
        services.close()
        if os.environ.get(dbcount.ENV):
            shutil.rmtree(os.environ.pop(dbcount.ENV), ignore_errors=True)
        if shared_redis:
            # A shared Redis keeps kombu's bindings and pidbox keys; every one carries the run id.
            try:
                count = forget_keys(shared_redis, f"{naming.prefix()}:")
                progress(f"deleted the run's {count} keys from the shared Redis")
            except Exception as exc:
                print(f"could not delete the run's Redis keys: {exc}", file=sys.stderr)

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")
    markdown = report.render(results)
    print(markdown)
    progress(f"results written to {path}")
    if args.write_docs:
        DOCS.write_text(report.replace_between_markers(DOCS.read_text(), markdown))
        progress(f"results section of {DOCS} updated")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
