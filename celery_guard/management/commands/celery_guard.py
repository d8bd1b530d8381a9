"""``manage.py celery_guard <subcommand>``: operator commands of celery_guard."""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

from celery import current_app
from django.contrib.auth import get_user_model
from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from celery_guard import conf, durations
from celery_guard.conf import guard_settings
from celery_guard.core import checks as core_checks
from celery_guard.delivery import services as delivery
from celery_guard.delivery.poller import Poller
from celery_guard.dlq import replay, services
from celery_guard.dlq.models import DeadLetter
from celery_guard.idempotency import dedup
from celery_guard.limits import services as limits_services
from celery_guard.management import doctor
from celery_guard.observability import alerts, rollups, status
from celery_guard.runs import launch
from celery_guard.runs import services as run_services
from celery_guard.runs.models import BulkRun

#: Longest ``doctor --timeout`` (seconds per network probe).
MAX_DOCTOR_TIMEOUT = 600.0


def _duration(option: str, value: float, **bounds: Any) -> float:
    """``value`` checked by the shared duration validator, or a CommandError naming ``option``."""
    try:
        return durations.seconds(value, **bounds)
    except (TypeError, ValueError) as exc:
        raise CommandError(f"{option} {exc}") from None


def _at_least(option: str, value: int | None, minimum: int) -> None:
    if value is not None and value < minimum:
        raise CommandError(f"{option} must be at least {minimum}, got {value}")


class Command(BaseCommand):
    """Dispatch to one subcommand method per operation (``handle_<name>``)."""

    help = "celery_guard operations: doctor, status, alerts, replay, purge, runs."

    def add_arguments(self, parser: CommandParser) -> None:
        """Declare the subcommands and their arguments."""
        sub = parser.add_subparsers(dest="subcommand", required=True, metavar="subcommand")
        d = sub.add_parser("doctor", help="Check configuration, broker, database and consumers.")
        d.add_argument("--timeout", type=float, default=2.0, help="Seconds per network probe.")
        st = sub.add_parser("status", help="The dashboard's figures: queues, dead letters, alerts.")
        st.add_argument("--json", action="store_true", help="Print JSON instead of tables.")
        sub.add_parser("alerts", help="Evaluate CELERY_GUARD_SLOS once: raise/resolve alerts.")
        r = sub.add_parser(
            "replay", help="Replay dead letters (status dead or unroutable) matching filters."
        )
        r.add_argument("--task", help="Exact task name.")
        r.add_argument("--reason", choices=[value for value, _ in DeadLetter.Reason.choices])
        r.add_argument("--exception", help="Exact exception class (module.QualName).")
        r.add_argument("--queue", help="Exact queue name.")
        r.add_argument("--since", help="Failed at or after: ISO date/datetime or age (2h, 7d).")
        r.add_argument("--until", help="Failed before: ISO date/datetime or age (2h, 7d).")
        r.add_argument("--limit", type=int, help="Replay at most this many (oldest first).")
        r.add_argument("--dry-run", action="store_true", help="Validate only; publish nothing.")
        r.add_argument("--rate", default="200/s", help="Publish rate: 200/s, 600/m, 10/h.")
        r.add_argument("--no-progress", action="store_true", help="No progress bar.")
        r.add_argument(
            "--user",
            help="The Django user (username) the replays are recorded and audited under in "
            "the admin log. Required, except with --dry-run.",
        )
        p = sub.add_parser(
            "purge",
            help="Delete idempotency records past their dedup window and the retention, "
            "replayed/discarded dead letters older than CELERY_GUARD_DLQ_RETENTION_DAYS, "
            "bulk runs finished more than CELERY_GUARD_RUNS_RETENTION_DAYS ago, dispatched "
            "outbox rows, and rollups older than CELERY_GUARD_ROLLUP_RETENTION_DAYS.",
        )
        p.add_argument(
            "--days", type=float, help="Dead letters: override CELERY_GUARD_DLQ_RETENTION_DAYS."
        )
        runs = sub.add_parser("runs", help="List bulk runs; watch one; sweep stalled ones.")
        runs.add_argument("--limit", type=int, default=20, help="Runs listed (newest first).")
        runs_sub = runs.add_subparsers(dest="runs_command", metavar="command")
        watch = runs_sub.add_parser("watch", help="A live progress bar until the run ends.")
        watch.add_argument("run_id", type=int)
        watch.add_argument("--interval", type=float, default=1.0, help="Seconds between polls.")
        runs_sub.add_parser(
            "sweep",
            help="Publish items and completions that a dead process left unpublished "
            "(after CELERY_GUARD_RUNS_SWEEP_GRACE).",
        )
        rl = sub.add_parser(
            "relay",
            help="Run the delivery poller in this process: publish due scheduled messages and "
            "outbox rows the fast path missed (workers run one too).",
        )
        rl.add_argument("--once", action="store_true", help="Poll once and exit.")
        for name, verb in (("pause", "Pause"), ("resume", "Resume")):
            pr = sub.add_parser(
                name,
                help=f"{verb} a task type: its deliveries are deferred (not dropped) while "
                "paused; workers apply it within CELERY_GUARD_POLICY_REFRESH seconds.",
            )
            pr.add_argument("task", help="The task's name.")
            pr.add_argument("--note", default=None, help="Why (kept on the task policy).")

    def handle(self, *args: Any, **options: Any) -> None:
        """Run the chosen subcommand."""
        getattr(self, f"handle_{options['subcommand'].replace('-', '_')}")(**options)

    def handle_pause(self, *, task: str, note: str | None = None, **options: Any) -> None:
        """Pause a task type (its task policy)."""
        self._pause(task, True, note)

    def handle_resume(self, *, task: str, note: str | None = None, **options: Any) -> None:
        """Resume a paused task type."""
        self._pause(task, False, note)

    def _pause(self, task: str, paused: bool, note: str | None) -> None:
        app = core_checks.celery_app()
        core_checks.guarded_tasks(app)
        if task not in app.tasks:
            self.stderr.write(f"warning: no task named {task!r} is registered here")
        limits_services.set_paused(task, paused, note)
        self.stdout.write(f"{task}: {'paused' if paused else 'resumed'}")

    def handle_status(self, json: bool = False, **options: Any) -> None:
        """Print the dashboard's figures as tables (or as JSON)."""
        figures = status.figures()
        if json:
            import json as json_module

            self.stdout.write(json_module.dumps(figures.as_json(), indent=2, default=str))
            return
        self.stdout.write(f"celery_guard status at {figures.at:%Y-%m-%d %H:%M:%S %Z}\n")
        self.stdout.write(
            _table(
                [
                    "queue",
                    "health",
                    "depth",
                    "oldest age",
                    "lag p95 (1h)",
                    "objective",
                    "done (1h)",
                    "failing",
                    "dead",
                ],
                [
                    [
                        q.queue,
                        q.health,
                        _num(q.depth),
                        _secs(q.oldest_age),
                        _secs(q.lag_p95),
                        _secs(q.lag_objective),
                        str(q.throughput),
                        _share(q.failure_share),
                        str(q.dead_letters),
                    ]
                    for q in figures.queues
                ],
            )
        )
        self.stdout.write("\nDead letters (open) by task:")
        self.stdout.write(
            _table(
                ["task", "queue", "count"],
                [[d.task_name, d.queue, str(d.count)] for d in figures.dead_letters],
            )
        )
        self.stdout.write("\nBeat leaders:")
        self.stdout.write(
            _table(
                ["lock", "holder", "token"],
                [[b.lock, b.holder or "(nobody)", _num(b.token)] for b in figures.leaders],
            )
        )
        self.stdout.write("\nOpen alerts:")
        self.stdout.write(
            _table(
                ["slo", "objective", "status", "value", "threshold"],
                [
                    [a["slo"], a["objective"], a["status"], _num(a["value"]), _num(a["threshold"])]
                    for a in figures.alerts
                ],
            )
        )

    def handle_alerts(self, **options: Any) -> None:
        """Evaluate the SLOs once and say what was raised and resolved."""
        summary = alerts.evaluate()
        for alert in summary.raised:
            self.stdout.write(self.style.ERROR(alerts.text(alert, raised=True)))
        for alert in summary.resolved:
            self.stdout.write(self.style.SUCCESS(alerts.text(alert, raised=False)))
        self.stdout.write(
            f"{len(summary.raised)} raised, {len(summary.resolved)} resolved, "
            f"{summary.pending} breach(es) not held long enough yet"
        )

    def handle_doctor(self, timeout: float, **options: Any) -> None:
        """Print the doctor report and the worker command lines; fail on errors."""
        timeout = _duration("--timeout", timeout, maximum=MAX_DOCTOR_TIMEOUT)
        report = doctor.run(timeout=timeout)
        styles = {
            "ok": self.style.SUCCESS,
            "warning": self.style.WARNING,
            "error": self.style.ERROR,
        }
        for level, text in report.lines:
            self.stdout.write(styles[level](f"[{level}] {text}"))
        self.stdout.write("\nWorker command lines, one pool per priority queue:")
        for line in doctor.worker_commands(current_app._get_current_object()):
            self.stdout.write(f"  {line}")
        if not report.ok:
            raise CommandError("celery_guard doctor found errors")

    def handle_replay(
        self,
        *,
        task: str | None,
        reason: str | None,
        exception: str | None,
        queue: str | None,
        since: str | None,
        until: str | None,
        limit: int | None,
        dry_run: bool,
        rate: str,
        no_progress: bool,
        user: str | None,
        **options: Any,
    ) -> None:
        """Replay matching dead letters through the same service as the admin action."""
        _at_least("--limit", limit, 1)
        operator = self._operator(user, required=not dry_run)
        try:
            per_second = replay.parse_rate(rate)
            rows = services.select(
                task=task,
                reason=reason,
                exception=exception,
                queue=queue,
                since=services.parse_when(since) if since else None,
                until=services.parse_when(until) if until else None,
            )
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        if limit is not None:
            rows = rows[:limit]
        ids = list(rows.values_list("pk", flat=True))
        total = len(ids)
        started = time.monotonic()

        def progress(done: int) -> None:
            if no_progress or (done % 50 and done != total):
                return
            width = 30
            filled = width * done // max(total, 1)
            bar = f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total}"
            self.stderr.write(bar, ending="\n" if done == total else "")
            self.stderr.flush()

        summary = replay.replay(
            ids,
            app=current_app._get_current_object(),
            user=operator,
            via="manage.py celery_guard replay",
            dry_run=dry_run,
            rate=per_second,
            progress=progress,
        )
        elapsed = time.monotonic() - started
        prefix = "dry run: would have " if dry_run else ""
        self.stdout.write(
            self.style.SUCCESS(
                f"{prefix}{summary} of {total} matching dead letter(s) in {elapsed:.1f}s"
            )
        )
        for pk, why in summary.reasons.items():
            self.stdout.write(self.style.WARNING(f"  unroutable #{pk}: {why}"))

    def _operator(self, username: str | None, *, required: bool) -> Any:
        """The Django user named by ``--user`` (None when absent and not required)."""
        if username is None:
            if required:
                raise CommandError(
                    "--user USERNAME is required: every replay is recorded in the admin log "
                    "under the Django user who made it (or use --dry-run)"
                )
            return None
        model = get_user_model()
        try:
            return model._default_manager.get_by_natural_key(username)
        except model.DoesNotExist as exc:
            raise CommandError(f"--user: no Django user {username!r}") from exc

    def handle_purge(self, *, days: float | None = None, **options: Any) -> None:
        """Purge expired idempotency records, old replayed/discarded dead letters, finished
        bulk runs, dispatched outbox rows and old rollups."""
        # Every retention is checked before anything is purged. Under a day would purge dead
        # letters replayed a moment ago, their replay history with them (the setting has the
        # same bounds).
        try:
            if days is None:
                days = conf.duration("DLQ_RETENTION_DAYS")
            runs_days = guard_settings.runs_retention_days
            rollup_days = guard_settings.rollup_retention_days
        except ImproperlyConfigured as exc:
            raise CommandError(str(exc)) from None
        days = _duration("--days", days, **conf.DURATIONS["DLQ_RETENTION_DAYS"])
        deleted = dedup.purge()
        self.stdout.write(self.style.SUCCESS(f"purged {deleted} expired idempotency record(s)"))
        letters = services.purge(days)
        self.stdout.write(self.style.SUCCESS(f"purged {letters} dead letter(s)"))
        bulk = run_services.purge(runs_days)
        self.stdout.write(self.style.SUCCESS(f"purged {bulk} finished bulk run(s)"))
        rows = delivery.purge()
        self.stdout.write(self.style.SUCCESS(f"purged {rows} dispatched outbox row(s)"))
        minutes = rollups.purge(timezone.now() - dt.timedelta(days=rollup_days))
        self.stdout.write(self.style.SUCCESS(f"purged {minutes} rollup row(s)"))

    def handle_relay(self, *, once: bool = False, **options: Any) -> None:
        """Run the delivery poller until interrupted (or once)."""
        app = current_app._get_current_object()
        # A worker imports the task modules at start; this process must too, to publish them.
        app.loader.import_default_modules()
        poller = Poller(app, outbox=True)
        if once:
            published = poller.tick()
            poller.release()
            self.stdout.write(f"published {max(published, 0)} message(s)")
            return
        self.stdout.write(f"relay: polling (schedule: {poller.backend}); Ctrl-C stops")
        try:
            poller.run()
        except KeyboardInterrupt:
            poller.release()

    def handle_runs(
        self,
        *,
        limit: int = 20,
        runs_command: str | None = None,
        run_id: int | None = None,
        interval: float = 1.0,
        **options: Any,
    ) -> None:
        """List runs, watch one until it ends, or sweep."""
        _at_least("--limit", limit, 1)
        _duration("--interval", interval, maximum=MAX_DOCTOR_TIMEOUT)
        if runs_command == "sweep":
            done = launch.sweep()
            self.stdout.write(
                f"published {done['items']} item(s) and {done['completions']} completion(s)"
            )
            return
        if runs_command == "watch":
            assert run_id is not None
            self._watch(run_id, interval)
            return
        self.stdout.write(f"{'id':>6}  {'status':<22} {'done':>15}  {'failed':>7}  name")
        for run in BulkRun.objects.order_by("-created_at", "-id")[:limit]:
            self.stdout.write(
                f"{run.pk:>6}  {run.status:<22} {f'{run.done}/{run.total}':>15}  "
                f"{run.failed:>7}  {run.name or run.task_name}"
            )

    def _watch(self, run_id: int, interval: float) -> None:
        while True:
            run = BulkRun.objects.filter(pk=run_id).first()
            if run is None:
                raise CommandError(f"no bulk run {run_id}")
            width = 30
            filled = width * run.done // max(run.total, 1)
            self.stdout.write(
                f"\r[{'#' * filled}{'.' * (width - filled)}] {run.done}/{run.total} "
                f"succeeded {run.succeeded} failed {run.failed} {run.status}",
                ending="",
            )
            self.stdout.flush()
            if run.is_finished:
                self.stdout.write("")
                return
            time.sleep(interval)


def _num(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _table(head: list[str], rows: list[list[str]]) -> str:
    """Rows as a plain-text table (``(none)`` when empty)."""
    if not rows:
        return "  (none)"
    widths = [max(len(str(cell)) for cell in column) for column in zip(head, *rows, strict=True)]
    lines = [head, ["-" * w for w in widths], *rows]
    return "\n".join(
        "  " + "  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True))
        for line in lines
    )
