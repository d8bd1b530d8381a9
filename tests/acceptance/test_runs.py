"""Bulk runs on real workers: injected failures, a SIGKILLed worker, the completion once."""

import collections
import os
import signal
import threading

import pytest
from celery import current_app
from django.db import connection

from celery_guard import start_run
from celery_guard.models import BulkRun, BulkRunItem, DeadLetter
from celery_guard.runs import launch, retry_failed
from tests.support.harness import wait_until
from tests.testapp.models import Execution
from tests.testapp.run_tasks import run_barrier, run_complete, run_item

pytestmark = pytest.mark.django_db(transaction=True)

#: Items of the crash test (the issue's 8,000 run by hand: CG_RUN_ITEMS=8000).
ITEMS = int(os.environ.get("CG_RUN_ITEMS", "600"))
#: Redelivery of a dead worker's messages, and takeover of the key it held, after seconds.
CRASH_ENV = {"CG_VISIBILITY_TIMEOUT": "5", "CG_IDEMPOTENCY_LEASE": "5"}


def injected(n):
    """2% permanent failures, 5% transient ones (they succeed on their retry)."""
    if n % 50 == 7:
        return "permanent"
    if n % 20 == 3:
        return "transient"
    return ""


def finished(run, timeout=600):
    wait_until(lambda: BulkRun.objects.get(pk=run.pk).finished_at is not None, timeout, 0.5)
    run.refresh_from_db()
    return run


def effects(prefix="run-item:"):
    rows = Execution.objects.filter(label__startswith=prefix).values_list("label", flat=True)
    return collections.Counter(rows)


def completions(label):
    return list(Execution.objects.filter(label=f"complete:{label}"))


class Sweeper(threading.Thread):
    """The periodic sweep production runs (beat's ``celery_guard.sweep_runs``), every 2 s."""

    def __init__(self):
        super().__init__(daemon=True)
        self.done = threading.Event()
        self.swept = collections.Counter()

    def run(self):
        try:
            while not self.done.wait(2):
                self.swept.update(launch.sweep())
        finally:
            connection.close()

    def stop(self):
        self.done.set()
        self.join(30)


def test_run_with_failures_and_a_killed_worker_ends_exact(
    start_worker, empty_queues, tmp_path, settings, monkeypatch
):
    # A SIGKILL can lose a message outright on Redis: one the killed worker's pending BRPOP
    # had already taken but not yet recorded as unacked. The sweep publishes such an item
    # again once its key shows no start within the start grace (docs/runs.md), with this
    # test's short redelivery times (the workers' CRASH_ENV) instead of an hour.
    monkeypatch.setitem(current_app.conf.broker_transport_options, "visibility_timeout", 5)
    settings.CELERY_GUARD_IDEMPOTENCY_START_GRACE = 5
    settings.CELERY_GUARD_RUNS_SWEEP_GRACE = 2
    sweeper = Sweeper()
    sweeper.start()
    fixed = tmp_path / "fixed"
    first = start_worker(["high"], concurrency=2, extra_env=CRASH_ENV)
    second = start_worker(["high"], concurrency=2, extra_env=CRASH_ENV)
    killed_at = []

    def kill_first_worker_mid_run():
        # start_run publishes while the workers already consume: kill once a quarter is done.
        try:
            run = wait_until(lambda: BulkRun.objects.filter(name="Salary update 2026-12").first())
            wait_until(lambda: BulkRun.objects.get(pk=run.pk).succeeded >= ITEMS // 4, 600, 0.2)
            first.signal(signal.SIGKILL)
            killed_at.append(BulkRun.objects.get(pk=run.pk).done)
        finally:
            connection.close()

    killer = threading.Thread(target=kill_first_worker_mid_run)
    killer.start()
    run = start_run(
        run_item,
        ({"n": n, "fail": injected(n), "fixed": str(fixed), "sleep_ms": 2} for n in range(ITEMS)),
        name="Salary update 2026-12",
        initiator="hr-batch",
        on_complete=run_complete.si(label="salary"),
    )
    assert run.total == ITEMS
    killer.join(600)
    first.process.wait(10)
    assert first.process.returncode == -signal.SIGKILL
    assert killed_at[0] < ITEMS  # the worker died mid-run

    run = finished(run)
    sweeper.stop()
    permanent = {n for n in range(ITEMS) if injected(n) == "permanent"}
    assert run.status == BulkRun.Status.COMPLETED_WITH_ERRORS
    assert (run.failed, run.skipped, run.cancelled) == (len(permanent), 0, 0)
    assert run.succeeded + run.failed == run.total == ITEMS
    assert run.pending == 0
    # Every item has exactly one final outcome, and the counters are those of the rows.
    statuses = collections.Counter(BulkRunItem.objects.filter(run=run).values_list("status"))
    assert statuses == {("succeeded",): ITEMS - len(permanent), ("failed",): len(permanent)}
    failed = BulkRunItem.objects.filter(run=run, status="failed")
    assert {item.kwargs["n"] for item in failed} == permanent
    assert {item.error_class for item in failed} == {"celery_guard.exceptions.PermanentError"}
    assert all(item.dead_letter_id for item in failed)
    assert DeadLetter.objects.filter(pk__in=[i.dead_letter_id for i in failed]).count() == len(
        permanent
    )
    transient = BulkRunItem.objects.filter(run=run, kwargs__fail="transient")
    assert {item.status for item in transient} == {"succeeded"}
    assert all(item.attempts >= 2 for item in transient)
    # At most one committed effect per item (self.guard.atomic()), exactly one per success.
    counts = effects()
    assert set(counts.values()) == {1}
    assert set(counts) == {f"run-item:{n}" for n in range(ITEMS) if n not in permanent}
    # The completion ran once, with the run's summary; a sweep does not publish it again.
    wait_until(lambda: completions("salary"), 60)
    assert published_completions([first, second], run) == 1
    settings.CELERY_GUARD_RUNS_SWEEP_GRACE = 0
    assert launch.sweep() == {"items": 0, "completions": 0}
    (done,) = completions("salary")
    assert done.guard_header["run"] == run.pk
    assert done.guard_header["failed"] == len(permanent)
    assert done.guard_header["status"] == "completed_with_errors"

    # Retry only the failed ones, now that their cause is fixed.
    fixed.touch()
    child = retry_failed(run, initiator="hr-batch")
    assert child.parent_id == run.pk
    assert child.total == len(permanent)
    assert {i.kwargs["n"] for i in BulkRunItem.objects.filter(run=child)} == permanent
    child = finished(child)
    assert (child.status, child.succeeded, child.failed) == ("succeeded", len(permanent), 0)
    counts = effects()
    assert set(counts.values()) == {1}
    assert len(counts) == ITEMS
    wait_until(lambda: len(completions("salary")) == 2, 60)
    second.stop()


def test_two_last_items_finishing_together_publish_the_completion_once(
    start_worker, empty_queues, tmp_path
):
    # One item each (prefetch multiplier 1); the barrier makes both end at the same moment.
    workers = [start_worker(["high"], concurrency=1) for _ in range(2)]
    for attempt in range(3):
        label = f"race-{attempt}"
        barrier = tmp_path / label
        barrier.mkdir()
        run = start_run(
            run_barrier,
            [{"n": n, "barrier": str(barrier), "peers": 2} for n in range(2)],
            on_complete=run_complete.si(label=label),
        )
        run = finished(run, 120)
        assert (run.status, run.succeeded) == ("succeeded", 2)
        wait_until(lambda label=label: completions(label), 60)
        assert len(completions(label)) == 1
        assert published_completions(workers, run) == 1


def published_completions(workers, run):
    """How many processes published the run's completion (their logs say so)."""
    line = f"celery_guard: run {run.pk} "
    return sum(
        1
        for worker in workers
        for text in worker.log_path.read_text(errors="replace").splitlines()
        if line in text and "completion" in text and "published" in text
    )
