"""``make demo``: the HR scenario, end to end, on real workers, from a fresh machine.

HR updates ``DEMO_SIZE`` (8,000) employee records; each employee gets one notification
through a mail gateway that throttles, fails and times out, as one bulk run whose
completion recalculates the salary report. While it runs: part of the run is submitted
again (deduplicated), a burst of password resets overtakes the bulk work, and the bulk
worker is SIGKILLed and restarted. Then the invalid addresses are fixed and only the failed
items are retried. The summary's invariants (nobody mailed twice, nothing lost, the report
recalculated once per run) decide the exit status, so the demo doubles as a check.

SQLite and an embedded Redis unless ``DATABASE_URL`` / ``REDIS_URL`` are given. ``--keep``
leaves the admin up; Ctrl-C stops every process the demo started.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEPARTMENTS = ("Finance", "Sales", "Engineering", "Support", "Legal", "Marketing", "Ops", "HR")
#: Share of employees with an address the gateway refuses (fixed before the retry).
INVALID_SHARE = 0.015
#: When, in items done, the scenario's events happen.
RESUBMIT_AT, RESETS_AT, KILL_AT = 0.15, 0.25, 0.40
#: Seconds after which Redis hands a killed worker's messages to another consumer.
VISIBILITY_TIMEOUT = 12
IDEMPOTENCY_LEASE = 8


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--size", type=int, default=int(os.environ.get("DEMO_SIZE", "8000")), help="employees"
    )
    parser.add_argument("--keep", action="store_true", help="leave the admin up at the end")
    parser.add_argument("--port", type=int, default=int(os.environ.get("DEMO_PORT", "8000")))
    parser.add_argument("--json", type=Path, help="also write the summary to this JSON file")
    parser.add_argument("--seed", type=int, default=2026)
    return parser.parse_args()


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


class Failed(Exception):
    """A step of the scenario did not happen in time."""


class Demo:
    """The scenario and every process it starts (stopped in :meth:`close`)."""

    def __init__(self, options: argparse.Namespace) -> None:
        self.size = max(options.size, 20)
        self.json_path = options.json
        self.rng = random.Random(options.seed)
        self.started = time.monotonic()
        self.workdir = Path(tempfile.mkdtemp(prefix="celery-guard-demo-"))
        self.processes: list[Any] = []
        self.redis: Any = None
        self.gateway: Any = None
        self.server: subprocess.Popen[bytes] | None = None
        self.port = options.port
        self.facts: dict[str, Any] = {"size": self.size}
        self.problems: list[str] = []
        self.tty = sys.stdout.isatty()
        self._last_line = 0.0

    # -- setup ---------------------------------------------------------------------------
    def prepare(self) -> None:
        """Services, settings, database, admin user, gateway, processes."""
        sys.path.insert(0, str(HERE))
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "proj.settings")
        from devprocs.embedded import ensure_redis_url, free_port

        database = "DATABASE_URL" in os.environ
        if not database:
            os.environ.setdefault("SQLITE_PATH", str(self.workdir / "demo.sqlite3"))
        redis_url, self.redis = ensure_redis_url()
        self.redis_url = redis_url
        self.facts["services"] = (
            ("PostgreSQL/DATABASE_URL" if database else "SQLite")
            + " + "
            + ("embedded Redis" if self.redis else "Redis at REDIS_URL")
        )
        self.say(
            f"database: {_masked(os.environ.get('DATABASE_URL') or os.environ['SQLITE_PATH'])}"
        )
        self.say(f"broker:   {_masked(redis_url)}" + (" (embedded)" if self.redis else ""))

        from hr.gateway import MailGateway

        # The bulk rate the gateway is promised; small demos go slower so the events still
        # happen mid-run. The gateway bears a little more than that.
        rate = max(5, min(150, self.size // 40))
        self.gateway = MailGateway(capacity=rate * 1.3, seed=self.rng.randrange(10**6)).start()
        os.environ.update(
            MAIL_GATEWAY_URL=self.gateway.url,
            MAIL_GATEWAY_RATE=f"{rate}/s",
            DEMO_VISIBILITY_TIMEOUT=str(VISIBILITY_TIMEOUT),
            DEMO_IDEMPOTENCY_LEASE=str(IDEMPOTENCY_LEASE),
            CELERY_GUARD_LOG_LEVEL="ERROR",
            DEMO_COUNT_DEFERRALS="1",
            DJANGO_DEBUG="0",
        )
        self.say(f"mail gateway: {self.gateway.url} (bears {rate * 1.3:.0f}/s; bulk {rate}/s)")

        import django
        from django.core.management import call_command

        django.setup()
        call_command("migrate", verbosity=0)
        self._admin_user()
        self._clean()
        self._employees()

        if not self.port or not self._port_free(self.port):
            self.port = free_port()
        self._start_workers()
        self._start_admin()

    def _admin_user(self) -> None:
        from django.contrib.auth import get_user_model

        password = secrets.token_urlsafe(9)
        user, _ = get_user_model().objects.get_or_create(
            username="admin", defaults={"email": "admin@example.com"}
        )
        user.is_staff = user.is_superuser = True
        user.set_password(password)
        user.save()
        self.facts["admin"] = {"username": "admin", "password": password}

    def _clean(self) -> None:
        from celery_guard.conf import guard_settings
        from hr.models import Employee, ReportRecalc
        from proj.celery import app

        Employee.objects.all().delete()  # cascades to notifications and resets
        ReportRecalc.objects.all().delete()
        with app.connection_for_write() as conn:
            for queue in guard_settings.priority_queues.values():
                conn.default_channel.queue_purge(queue)
        self._deferrals(reset=True)

    def _deferrals(self, reset: bool = False) -> dict[str, int]:
        """Deferrals the workers counted, by kind (``hr.apps``)."""
        import redis

        from hr.apps import DEFERRALS_KEY

        client = redis.Redis.from_url(self.redis_url)
        try:
            if reset:
                client.delete(DEFERRALS_KEY)
                return {}
            found = client.hgetall(DEFERRALS_KEY)
            return {k.decode(): int(v) for k, v in sorted(found.items())}
        finally:
            client.close()

    def _employees(self) -> None:
        from hr.models import Employee

        first = ("Ada", "Ben", "Chloe", "Dmitri", "Eva", "Farid", "Greta", "Hugo", "Ines", "Jon")
        last = ("Meyer", "Okafor", "Silva", "Tanaka", "Novak", "Haddad", "Larsen", "Rossi")
        rows = []
        for i in range(self.size):
            name = f"{self.rng.choice(first)} {self.rng.choice(last)}"
            local = f"{name.lower().replace(' ', '.')}.{i}"
            email = f"{local}@example.com"
            if self.rng.random() < INVALID_SHARE:
                email = self.rng.choice((f"{local}.example.com", f"{local}@", f"{local}@exa mple"))
            rows.append(
                Employee(
                    name=name,
                    email=email,
                    department=self.rng.choice(DEPARTMENTS),
                    salary=self.rng.randrange(40_000, 120_000, 500),
                )
            )
        Employee.objects.bulk_create(rows, batch_size=1000)
        self.say(f"{self.size} employees in {len(DEPARTMENTS)} departments")

    @staticmethod
    def _port_free(port: int) -> bool:
        import socket

        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                return False
        return True

    def _start_workers(self) -> None:
        from celery_guard.conf import guard_settings
        from devprocs.launcher import CeleryProcess

        self.workers: dict[str, Any] = {}
        for level, queue in guard_settings.priority_queues.items():
            worker = self._worker(level, queue)
            self.workers[level] = worker
            worker.launch()
        beat = CeleryProcess.beat(
            "proj",
            name="demo-beat",
            scheduler="celery_guard.beat:GuardedScheduler",
            loglevel="WARNING",
            log_path=self.workdir / "beat.log",
        )
        self.processes.append(beat)
        beat.launch()
        for worker in self.workers.values():
            worker.wait_ready()
        beat.wait_ready()
        self.say(
            "workers: "
            + ", ".join(f"{w.name} ({' '.join(w.args[1:3])})" for w in self.workers.values())
            + f"; guarded beat; logs in {self.workdir}"
        )

    def _worker(self, level: str, queue: str) -> Any:
        from devprocs.launcher import CeleryProcess

        worker = CeleryProcess.worker(
            "proj",
            [queue],
            name=f"demo-{level}",
            hostname=f"{level}@demo",
            # Mail tasks mostly wait: on the gateway (1 % of its answers stall 1.5 s) and on
            # SQLite's one writer. Six bulk processes keep both cores busy through those waits
            # (three left them idle half the time); the resets need only a couple.
            concurrency={"low": 6, "high": 2}.get(level, 1),
            loglevel="WARNING",
            log_path=self.workdir / f"worker-{level}-{len(self.processes)}.log",
        )
        self.processes.append(worker)
        return worker

    def _start_admin(self) -> None:
        command = [
            sys.executable,
            "manage.py",
            "runserver",
            f"127.0.0.1:{self.port}",
            "--noreload",
            "--skip-checks",
        ]
        log = (self.workdir / "admin.log").open("wb")
        self.server = subprocess.Popen(
            command,
            cwd=HERE,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "DJANGO_DEBUG": "1"},  # the admin's static files
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/admin/login/", timeout=2):
                    break
            except OSError:
                if self.server.poll() is not None or time.monotonic() > deadline:
                    log = self.workdir / "admin.log"
                    raise Failed(f"the admin did not start (see {log})") from None
                time.sleep(0.2)
        admin = self.facts["admin"]
        self.say(
            f"admin: {self.url}/admin/  user {admin['username']}  password {admin['password']}"
        )

    @property
    def url(self) -> str:
        """Base URL of the admin."""
        return f"http://127.0.0.1:{self.port}"

    # -- the scenario --------------------------------------------------------------------
    def scenario(self) -> None:
        """Run the bulk update with its events, then retry the failed items."""
        from django.db import connection
        from django.utils import timezone

        from celery_guard import start_run
        from celery_guard.models import BulkRun
        from hr.models import Employee
        from hr.tasks import notify_employee, recalc_report

        self.version = timezone.now().strftime("salary-%Y%m%dT%H%M%S")
        self.employees = list(Employee.objects.order_by("pk").values_list("pk", "email"))
        self.invalid = {pk for pk, email in self.employees if not _valid(email)}
        self.begun = timezone.now()
        self.say(
            f"\nbulk run: notify {self.size} employees of {self.version} "
            f"({len(self.invalid)} have an invalid address)"
        )
        publisher_error: list[BaseException] = []

        def publish() -> None:
            try:
                self.run = start_run(
                    notify_employee,
                    (
                        {"employee_id": pk, "event_version": self.version}
                        for pk, _ in self.employees
                    ),
                    name=f"Salary update {self.version}",
                    initiator="hr-demo",
                    on_complete=recalc_report.si(event_version=self.version),
                )
            except BaseException as exc:  # reported by the main thread
                publisher_error.append(exc)
            finally:
                connection.close()

        publisher = threading.Thread(target=publish, name="start_run", daemon=True)
        publisher.start()
        events = {"resubmit": False, "resets": False, "kill": False}
        run_id = None
        deadline = time.monotonic() + max(600, self.size / 10)
        while True:
            if publisher_error:
                raise publisher_error[0]
            if run_id is None:
                found = BulkRun.objects.filter(name=f"Salary update {self.version}").first()
                if found is None:
                    time.sleep(0.1)
                    continue
                run_id = found.pk
            run = BulkRun.objects.get(pk=run_id)
            self.progress(run)
            published = not publisher.is_alive()
            if published and not events["resubmit"] and run.done >= self.size * RESUBMIT_AT:
                events["resubmit"] = True
                self.resubmit()
            if not events["resets"] and run.done >= self.size * RESETS_AT:
                events["resets"] = True
                self.password_resets()
            if not events["kill"] and run.done >= self.size * KILL_AT:
                events["kill"] = True
                self.kill_worker(run)
            if run.finished_at is not None and published:
                break
            if time.monotonic() > deadline:
                raise Failed(f"the bulk run did not finish in time: {run.done}/{run.total}")
            time.sleep(0.25)
        self.progress(run, final=True)
        if not all(events.values()):
            raise Failed(f"not every event happened mid-run: {events}")
        self.run.refresh_from_db()
        self.after_run()

    def progress(self, run: Any, final: bool = False) -> None:
        """The live progress bar (a line every few seconds when not on a terminal)."""
        now = time.monotonic()
        if not self.tty and not final and now - self._last_line < 5:
            return
        self._last_line = now
        total = max(run.total, 1)
        width = 30
        filled = int(width * run.done / total)
        elapsed = max(now - self.started, 0.001)
        resets = self._resets_sent()
        line = (
            f"[{'#' * filled}{'.' * (width - filled)}] {run.done:>6}/{run.total} "
            f"{100 * run.done / total:5.1f}%  ok {run.succeeded}  failed {run.failed}  "
            f"resets {resets}  {elapsed:5.0f}s"
        )
        if self.tty:
            sys.stdout.write("\r" + line + ("\n" if final else ""))
            sys.stdout.flush()
        else:
            print(line, flush=True)

    def say(self, text: str) -> None:
        """An event line (above the progress bar on a terminal)."""
        if self.tty:
            sys.stdout.write("\r\033[K")
        print(text, flush=True)

    def _resets_sent(self) -> str:
        from hr.models import PasswordReset

        requested = PasswordReset.objects.count()
        if not requested:
            return "-"
        return f"{PasswordReset.objects.exclude(sent_at=None).count()}/{requested}"

    def resubmit(self) -> None:
        """HR's tool submits part of the batch again while it runs: a second run."""
        from celery_guard import start_run
        from hr.tasks import notify_employee

        valid = [pk for pk, _ in self.employees if pk not in self.invalid]
        part = valid[int(len(valid) * 0.1) : int(len(valid) * 0.2)]
        self.duplicate = start_run(
            notify_employee,
            ({"employee_id": pk, "event_version": self.version} for pk in part),
            name=f"Salary update {self.version} (submitted again)",
            initiator="hr-demo (double click)",
        )
        self.say(f"re-submitted {len(part)} employees of the run as run #{self.duplicate.pk}")

    def password_resets(self) -> None:
        """A burst of password resets on the high queue, behind the bulk backlog."""
        from django.utils import timezone

        from hr.models import PasswordReset
        from hr.tasks import send_password_reset

        count = max(5, min(100, self.size // 80))
        valid = [pk for pk, _ in self.employees if pk not in self.invalid]
        chosen = self.rng.sample(valid, count)
        for pk in chosen:
            reset = PasswordReset.objects.create(employee_id=pk, requested_at=timezone.now())
            send_password_reset.delay(reset.pk)
        self.say(f"{count} password resets requested (high priority)")

    def kill_worker(self, run: Any) -> None:
        """SIGKILL the bulk worker mid-run and start it again."""
        old = self.workers["low"]
        old.kill()
        self.facts["killed_at"] = run.done
        self.say(f"SIGKILLed {old.name} (pid {old.pid}) at {run.done}/{run.total}; restarting")
        new = self._worker("low", old.args[2])
        self.workers["low"] = new
        new.start()
        self.say(f"{new.name} is back (pid {new.pid})")

    def after_run(self) -> None:
        """Wait for the report, fix the addresses, retry the failed items."""
        from celery_guard.models import BulkRun
        from celery_guard.runs import retry_failed
        from hr.models import Employee

        self.wait_report(self.run.pk)
        self.sends_after_run = self.gateway.stats.sends("salary-update")
        self.say(
            f"run #{self.run.pk} {self.run.status}: {self.run.succeeded} sent, "
            f"{self.run.failed} failed; report recalculated"
        )
        if not self.run.failed:
            self.child = None
            return
        for employee in Employee.objects.filter(pk__in=self.invalid):
            local = employee.email.split("@")[0].replace(".example.com", "")
            employee.email = f"{local}@example.com"
            employee.save(update_fields=["email"])
        self.child = retry_failed(self.run, initiator="hr-demo")
        self.say(
            f"fixed {len(self.invalid)} addresses; retrying only the failed items as run "
            f"#{self.child.pk}"
        )
        deadline = time.monotonic() + 300
        while (child := BulkRun.objects.get(pk=self.child.pk)).finished_at is None:
            if time.monotonic() > deadline:
                raise Failed(f"the retry run did not finish: {child.done}/{child.total}")
            time.sleep(0.25)
        self.child = child
        self.wait_report(child.pk)
        self.say(f"run #{child.pk} {child.status}: {child.succeeded} sent, {child.failed} failed")

    def wait_report(self, run_id: int) -> None:
        """Wait for the run's completion to recalculate the report (and a moment more)."""
        from hr.models import ReportRecalc

        deadline = time.monotonic() + 120
        while not ReportRecalc.objects.filter(run_id=run_id).exists():
            if time.monotonic() > deadline:
                self.problems.append(f"the report was not recalculated for run #{run_id}")
                return
            time.sleep(0.2)

    # -- summary and invariants ----------------------------------------------------------
    def summary(self) -> None:
        """Print the summary and check the invariants (``self.problems``)."""
        from celery_guard.models import BulkRunItem, DeadLetter
        from hr.models import Employee, Notification, PasswordReset, ReportRecalc
        from hr.tasks import notify_employee

        time.sleep(2)  # a second recalculation or send would show up now
        run, duplicate, child = self.run, self.duplicate, self.child
        check = self.check
        final = self.gateway.stats.sends("salary-update")
        everyone = [pk for pk, _ in self.employees]
        rows = Counter(
            Notification.objects.filter(event_version=self.version).values_list(
                "employee_id", flat=True
            )
        )
        after = _histogram(self.sends_after_run, everyone)
        at_end = _histogram(final, everyone)
        failed_ids = {
            item["employee_id"]
            for item in BulkRunItem.objects.filter(run=run, status="failed").values_list(
                "kwargs", flat=True
            )
        }
        retried = sum(
            a - 1
            for a in BulkRunItem.objects.filter(run__in=[run.pk, child.pk if child else 0])
            .filter(attempts__gt=1)
            .values_list("attempts", flat=True)
        )
        dead = DeadLetter.objects.filter(
            task_name=notify_employee.name, failed_at__gte=self.begun
        ).count()
        resets = list(PasswordReset.objects.all())
        waits = sorted(
            (r.started_at - r.requested_at).total_seconds() for r in resets if r.started_at
        )
        p95 = waits[max(0, math.ceil(0.95 * len(waits)) - 1)] if waits else None
        reset_sends = self.gateway.stats.sends("password-reset")
        reports = Counter(ReportRecalc.objects.values_list("run_id", flat=True))
        duration = time.monotonic() - self.started
        deferrals = self._deferrals()

        check(run.total == self.size, f"run total {run.total} != {self.size}")
        check(run.pending == 0, f"{run.pending} items of the run never finished")
        check(
            run.succeeded + run.failed == run.total and run.skipped == 0,
            f"run counters do not add up: {run.succeeded}+{run.failed}+{run.skipped}",
        )
        check(failed_ids == self.invalid, "the failed items are not the invalid addresses")
        check(
            duplicate.skipped == duplicate.total,
            f"re-submission: {duplicate.skipped}/{duplicate.total} deduplicated",
        )
        check(after[2] == 0 and at_end[2] == 0, "an employee was mailed twice")
        check(
            {pk for pk in everyone if not self.sends_after_run[pk]} == self.invalid,
            "after the run, the employees without a mail are not exactly the invalid ones",
        )
        check(at_end[1] == self.size, f"after the retry {at_end[1]}/{self.size} mailed once")
        check(dict(rows) == dict(final), "notification rows differ from the gateway's sends")
        check(dead == len(self.invalid), f"{dead} dead letters for {len(self.invalid)} invalid")
        check(reports[run.pk] == 1, f"report recalculated {reports[run.pk]}x for the run")
        if child is not None:
            check(child.succeeded == child.total, f"retry run: {child.failed} failed")
            check(reports[child.pk] == 1, f"report recalculated {reports[child.pk]}x (retry)")
        check(reports[duplicate.pk] == 0, "the re-submitted run recalculated the report")
        check(
            all(r.sent_at for r in resets) and all(reset_sends[r.employee_id] == 1 for r in resets),
            "a password reset was not sent exactly once",
        )
        overtook = sum(1 for r in resets if r.sent_at and r.sent_at < run.finished_at)
        check(overtook == len(resets), f"{overtook}/{len(resets)} resets beat the bulk run")
        check(0 < self.facts.get("killed_at", 0) < self.size, "no worker was killed mid-run")
        check(Employee.objects.count() == self.size, "employees lost")

        self.facts.update(
            processed=run.done,
            sent=sum(final.values()),
            sent_first_pass=sum(self.sends_after_run.values()),
            deduplicated=duplicate.skipped,
            resubmitted=duplicate.total,
            retried=retried,
            dead_lettered=dead,
            invalid=len(self.invalid),
            sends_per_employee_after_run=after,
            sends_per_employee=at_end,
            password_resets=len(resets),
            password_reset_p95_wait=p95,
            reports={"run": reports[run.pk], "retry": reports[child.pk] if child else None},
            runs={"run": run.pk, "resubmitted": duplicate.pk, "retry": child.pk if child else None},
            gateway_answers=dict(self.gateway.stats.answers),
            deferrals=deferrals,
            duration=round(duration, 1),
            problems=self.problems,
        )
        p95_text = f"{p95:.2f} s" if p95 is not None else "-"
        lines = [
            "",
            f"summary (DEMO_SIZE={self.size}, {self.facts['services']})",
            f"  processed          {run.done} items in run #{run.pk} ({run.succeeded} sent, "
            f"{run.failed} failed), {child.total if child else 0} retried in run "
            f"#{child.pk if child else '-'}",
            f"  sent               {sum(final.values())} notifications "
            f"(+{sum(reset_sends.values())} password resets)",
            f"  deduplicated       {duplicate.skipped} of {duplicate.total} re-submitted "
            f"(run #{duplicate.pk})",
            f"  retried            {retried} extra attempts (429, 5xx, timeouts, the kill)",
            f"  dead-lettered      {dead} (invalid addresses; retried after the fix)",
            f"  sends per employee after the run: 0: {after[0]}  1: {after[1]}  2+: {after[2]}"
            f";  after the retry: 0: {at_end[0]}  1: {at_end[1]}  2+: {at_end[2]}",
            f"  password resets    {len(resets)}, p95 wait {p95_text}, {overtook} done before "
            "the bulk run",
            f"  worker killed      at {self.facts.get('killed_at')}/{self.size}, restarted",
            f"  report recalc      {reports[run.pk]}x for run #{run.pk}"
            + (f", {reports[child.pk]}x for retry run #{child.pk}" if child else ""),
            f"  gateway answers    {_answers(self.gateway.stats.answers)}",
            f"  deferred           {sum(deferrals.values())} over-limit republishes"
            + (f" ({_answers(Counter(deferrals))})" if deferrals else ""),
            f"  duration           {duration:.1f} s",
            "",
            f"  run card:  {self.url}/admin/celery_guard/bulkrun/{run.pk}/change/",
            f"  DLQ:       {self.url}/admin/celery_guard/deadletter/",
            f"  dashboard: {self.url}/admin/celery_guard/dashboard/",
            f"  login:     admin / {self.facts['admin']['password']}",
            "",
            "invariants: OK"
            if not self.problems
            else "invariants FAILED:\n" + "\n".join(f"  - {p}" for p in self.problems),
        ]
        print("\n".join(lines), flush=True)
        if self.json_path:
            self.json_path.write_text(json.dumps(self.facts, indent=2, default=str))

    def check(self, condition: bool, problem: str) -> None:
        """Record a broken invariant."""
        if not condition:
            self.problems.append(problem)

    # -- teardown ------------------------------------------------------------------------
    def close(self) -> None:
        """Stop every process the demo started, and only those."""
        if self.server is not None and self.server.poll() is None:
            os.killpg(self.server.pid, signal.SIGTERM)
            try:
                self.server.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.server.pid, signal.SIGKILL)
        for process in reversed(self.processes):
            process.stop(timeout=10)
        if self.gateway is not None:
            self.gateway.stop()
        if self.redis is not None:
            self.redis.stop()
        try:
            from django.db import connections

            connections.close_all()
        except Exception:
            pass
        shutil.rmtree(self.workdir, ignore_errors=True)
        print("stopped every process the demo started", flush=True)


def _masked(url: str) -> str:
    """``url`` without its password."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if not parts.password:
        return url
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")).geturl()


def _valid(email: str) -> bool:
    from hr.gateway import ADDRESS

    return bool(ADDRESS.match(email))


def _histogram(sends: Counter[int], everyone: list[int]) -> dict[int, int]:
    counts = Counter(min(sends.get(pk, 0), 2) for pk in everyone)
    return {0: counts[0], 1: counts[1], 2: counts[2]}


def _answers(answers: Counter[str]) -> str:
    return ", ".join(f"{kind}: {n}" for kind, n in sorted(answers.items()))


def main() -> int:
    """Run the scenario; 0 when every invariant holds."""
    options = _arguments()
    # Ctrl-C (and a SIGTERM) stop the demo and everything it started, even when its parent
    # started it with SIGINT ignored (a background job of a script).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    demo = Demo(options)
    try:
        demo.prepare()
        demo.scenario()
        demo.summary()
        if options.keep:
            print(
                f"\n--keep: the admin stays up at {demo.url}/admin/ ; Ctrl-C stops everything",
                flush=True,
            )
            while True:
                time.sleep(3600)
        return 1 if demo.problems else 0
    except Failed as exc:
        print(f"\ndemo failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 1 if demo.problems else 130
    finally:
        demo.close()


if __name__ == "__main__":
    sys.exit(main())
