"""``manage.py celery_guard <subcommand>``: operator commands of celery_guard."""

from __future__ import annotations

from typing import Any

from celery import current_app
from django.core.management.base import BaseCommand, CommandError, CommandParser

from celery_guard import doctor, idempotency


class Command(BaseCommand):
    """Dispatch to one subcommand method per operation (``handle_<name>``)."""

    help = "celery_guard operations: doctor, purge."

    def add_arguments(self, parser: CommandParser) -> None:
        """Declare the subcommands and their arguments."""
        sub = parser.add_subparsers(dest="subcommand", required=True, metavar="subcommand")
        d = sub.add_parser("doctor", help="Check configuration, broker, database and consumers.")
        d.add_argument("--timeout", type=float, default=2.0, help="Seconds per network probe.")
        sub.add_parser(
            "purge",
            help="Delete idempotency records past their dedup window and the retention.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        """Run the chosen subcommand."""
        getattr(self, f"handle_{options['subcommand']}")(**options)

    def handle_doctor(self, timeout: float, **options: Any) -> None:
        """Print the doctor report and the worker command lines; fail on errors."""
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

    def handle_purge(self, **options: Any) -> None:
        """Purge expired idempotency records and say how many."""
        deleted = idempotency.purge()
        self.stdout.write(self.style.SUCCESS(f"purged {deleted} expired idempotency record(s)"))
