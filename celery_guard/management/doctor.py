"""``celery_guard doctor``: checks, reachability of broker and database, queue consumers."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from celery import current_app
from django.core import checks
from django.db import connection

from celery_guard.conf import guard_settings
from celery_guard.delivery import poller
from celery_guard.idempotency.models import IdempotencyRecord, never_started
from celery_guard.limits import checks as limits_checks
from celery_guard.limits import store
from celery_guard.limits.models import TaskPolicy


@dataclass
class Report:
    """What ``doctor`` found; ``ok`` is False when anything would stop guarded tasks."""

    lines: list[tuple[str, str]] = field(default_factory=list)
    ok: bool = True

    def add(self, level: str, text: str) -> None:
        """Record a line; level is ``ok``, ``warning`` or ``error``."""
        self.lines.append((level, text))
        if level == "error":
            self.ok = False


def _check_messages(report: Report) -> None:
    messages = checks.run_checks(tags=["celery_guard"], include_deployment_checks=False)
    for message in messages:
        level = "error" if message.is_serious() else "warning"
        hint = f" ({message.hint})" if message.hint else ""
        report.add(level, f"{message.id}: {message.msg}{hint}")
    if not messages:
        report.add("ok", "system checks: no issues")


def _timed(func: Callable[[], Any]) -> float:
    start = time.perf_counter()
    func()
    return (time.perf_counter() - start) * 1000


def _check_database(report: Report) -> None:
    def ping() -> None:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")

    try:
        ms = _timed(ping)
    except Exception as exc:
        report.add("error", f"database {connection.vendor}: unreachable: {exc}")
    else:
        report.add("ok", f"database {connection.vendor}: reachable ({ms:.1f} ms)")


def _check_broker(app: Any, report: Report, timeout: float) -> bool:
    with app.connection_for_write() as conn:
        uri = conn.as_uri()
        try:
            ms = _timed(lambda: conn.ensure_connection(max_retries=1, timeout=timeout))
        except Exception as exc:
            report.add("error", f"broker {uri}: unreachable: {exc}")
            return False
    report.add("ok", f"broker {uri}: reachable ({ms:.1f} ms)")
    return True


def _check_consumers(app: Any, report: Report, timeout: float) -> None:
    replies = app.control.inspect(timeout=timeout).active_queues() or {}
    consumers: dict[str, list[str]] = {}
    for worker, queues in replies.items():
        for queue in queues:
            consumers.setdefault(queue["name"], []).append(worker)
    for level, queue in guard_settings.priority_queues.items():
        workers = consumers.get(queue)
        if workers:
            report.add("ok", f"priority {level!r} -> queue {queue!r}: {', '.join(sorted(workers))}")
        else:
            report.add("warning", f"priority {level!r} -> queue {queue!r}: no worker consumes it")


def _check_never_started(report: Report) -> None:
    """Count the keys claimed and published but never started (their messages were lost)."""
    if guard_settings.idempotency_backend != "database":
        # Counting them in Redis means a SCAN of every key of the ledger: too costly here.
        report.add(
            "ok",
            "idempotency keys claimed, never started: not counted with the Redis ledger "
            "(the next enqueue of such a key takes it over)",
        )
        return
    try:
        count = IdempotencyRecord.objects.filter(never_started()).count()
    except Exception as exc:
        report.add("warning", f"idempotency keys claimed, never started: not counted: {exc}")
        return
    if count:
        report.add(
            "warning",
            f"idempotency keys claimed, never started: {count} (published, no worker started "
            "them by their start-by time: lost messages; the next enqueue of each runs it; "
            "see the admin's 'claimed, never started' filter)",
        )
    else:
        report.add("ok", "idempotency keys claimed, never started: none")


def _check_poller(app: Any, report: Report) -> None:
    try:
        holder = poller.alive(app)
    except Exception as exc:
        report.add("error", f"delivery poller: cannot tell whether one is alive: {exc}")
        return
    if holder:
        report.add("ok", f"delivery poller: alive ({holder})")
    else:
        report.add(
            "warning",
            "delivery poller: none alive; scheduled retries, countdowns and missed outbox rows "
            "wait until a worker (or `manage.py celery_guard relay`) runs",
        )


def _check_limits(app: Any, report: Report) -> None:
    limited = limits_checks.limited_tasks(app)
    if limited:
        try:
            ms = _timed(lambda: store.get_store().ping())
        except Exception as exc:
            report.add(
                "error",
                f"limits store: unreachable: {exc}; {len(limited)} limited task type(s) run "
                f"without their limits (CELERY_GUARD_LIMITS_ON_OUTAGE="
                f"{guard_settings.limits_on_outage!r})",
            )
        else:
            report.add("ok", f"limits store: reachable ({store.backend()}, {ms:.1f} ms)")
    try:
        paused = list(TaskPolicy.objects.filter(paused=True).values_list("task_name", flat=True))
    except Exception as exc:
        report.add("warning", f"task policies: not read: {exc}")
        return
    if paused:
        report.add("warning", f"task types paused (deferred until resumed): {', '.join(paused)}")


def worker_commands(app: Any) -> list[str]:
    """Return one worker command line per priority queue, so each level has its own pool."""
    queues = dict.fromkeys(guard_settings.priority_queues.values())
    return [f"celery -A {app.main or 'proj'} worker -Q {q} -n {q}@%h" for q in queues]


def run(timeout: float = 2.0) -> Report:
    """Run every doctor step and return the report."""
    app = current_app._get_current_object()
    report = Report()
    _check_messages(report)
    _check_database(report)
    _check_never_started(report)
    _check_limits(app, report)
    if _check_broker(app, report, timeout):
        _check_consumers(app, report, timeout)
        _check_poller(app, report)
    return report
