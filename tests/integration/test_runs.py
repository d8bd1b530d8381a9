"""Bulk runs without workers: validation before anything is written, sweep, cancel, purge."""

import collections
import datetime as dt
import time

import pytest
from django.core.management import call_command
from django.utils import timezone

from celery_guard import RunItemError, start_run
from celery_guard.idempotency import dedup
from celery_guard.idempotency.ledger import DatabaseLedger
from celery_guard.models import BulkRun, BulkRunItem, DeadLetter
from celery_guard.runs import cancel, launch, retry_failed, services
from tests.support.harness import queue_length
from tests.testapp.idem_tasks import idem_notify
from tests.testapp.run_tasks import run_complete, run_item

CLAIM = DatabaseLedger.claim

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("empty_queues")]


def test_a_bad_item_names_its_index_and_nothing_is_written_or_published(redis_url, queues):
    items = [{"n": 0}, {"n": 1}, {"n": 2, "colour": "red"}, {"n": 3}]
    with pytest.raises(RunItemError, match=r"item 2: .*colour") as info:
        start_run(run_item, items, name="bad")
    assert info.value.index == 2
    with pytest.raises(RunItemError, match=r"item 1: .*JSON"):
        start_run(run_item, [{"n": 0}, {"n": object()}])
    with pytest.raises(RunItemError, match="item 0 must be a mapping"):
        start_run(run_item, [(1,)])
    assert not BulkRun.objects.exists()
    assert not BulkRunItem.objects.exists()
    assert queue_length(redis_url, queues["high"]) == 0


def test_start_run_rejects_an_unguarded_task_and_a_non_signature_completion():
    with pytest.raises(TypeError, match="not a guarded task"):
        start_run(print, [{}])
    with pytest.raises(TypeError, match="expected a signature"):
        start_run(run_item, [{"n": 1}], on_complete=run_complete)


def test_items_are_published_once_each_in_chunks(redis_url, queues, monkeypatch):
    monkeypatch.setattr(launch, "CHUNK", 100)
    run = start_run(run_item, ({"n": n} for n in range(250)), name="p", initiator="hr")
    assert (run.total, run.status, run.pending, run.initiator) == (250, "queued", 250, "hr")
    assert run.published
    assert BulkRunItem.objects.filter(run=run, published=True).count() == 250
    assert queue_length(redis_url, queues["high"]) == 250
    keys = set(BulkRunItem.objects.filter(run=run).values_list("key", flat=True))
    assert len(keys) == 250


def test_a_small_first_chunk_goes_out_before_the_full_chunks_keys_are_claimed(
    redis_url, queues, monkeypatch
):
    monkeypatch.setattr(launch, "CHUNK", 100)
    monkeypatch.setattr(launch, "FIRST_PUBLISH_CHUNK", 10)
    claimed, queued_before = [], []
    real_claim = DatabaseLedger.claim_many

    def claim_many(self, claims, **kwargs):
        claimed.append(len(claims))
        queued_before.append(queue_length(redis_url, queues["high"]))
        return real_claim(self, claims, **kwargs)

    monkeypatch.setattr(DatabaseLedger, "claim_many", claim_many)
    run = start_run(run_item, ({"n": n} for n in range(250)), name="first")
    assert claimed == [10, 100, 100, 40]
    # The second chunk's keys are claimed once the first chunk's messages are out.
    assert queued_before == [0, 10, 110, 210]
    assert queue_length(redis_url, queues["high"]) == 250
    assert BulkRunItem.objects.filter(run=run, published=True).count() == 250


def test_keys_are_claimed_per_chunk_and_held_keys_skip_or_fail_their_items(
    redis_url, queues, monkeypatch
):
    held = idem_notify.apply_async(kwargs={"employee_id": 1, "event_version": "7"})
    single = []
    monkeypatch.setattr(
        DatabaseLedger,
        "claim",
        lambda self, key, **kw: single.append(key) or CLAIM(self, key, **kw),
    )
    items = [
        {"employee_id": 1, "event_version": "7"},  # held by the call above: skipped
        {"employee_id": 2, "event_version": "7"},
        {"employee_id": 2, "event_version": "7"},  # the same call again in the run: skipped
        {"employee_id": 3, "event_version": "7"},
        {"employee_id": 3, "event_version": "7", "note": "other"},  # other arguments: failed
    ]
    run = start_run(idem_notify, items)
    # One bulk claim for the chunk; only the key that existed took the one-by-one path.
    assert single == ["tests.testapp.idem_tasks.idem_notify:notify:1:7"]
    run.refresh_from_db()
    assert (run.total, run.skipped, run.failed, run.pending) == (5, 2, 1, 2)
    rows = BulkRunItem.objects.filter(run=run).order_by("seq")
    assert [row.status for row in rows] == ["skipped", "pending", "skipped", "pending", "failed"]
    assert rows[4].error_class == "celery_guard.exceptions.IdempotencyConflict"
    assert queue_length(redis_url, queues["high"]) == 3  # the held call and two items
    for row in (rows[1], rows[3]):
        record = DatabaseLedger().get(row.key)
        assert (record["task_id"], record["lease_expires_at"]) == (row.task_id, None)
        assert record["start_by"] is not None  # confirmed
    assert DatabaseLedger().get(rows[0].key)["task_id"] == held.id


def test_retry_failed_frees_the_task_own_keys_its_failed_items_hold(redis_url, queues):
    run = start_run(idem_notify, [{"employee_id": n, "event_version": "8"} for n in range(2)])
    lost, done = BulkRunItem.objects.filter(run=run).order_by("seq")
    # Item 0's worker died holding its key and the message was lost: the sweep failed it.
    services.start_item(run.pk, lost.pk, mark_run=True)
    DatabaseLedger().start(
        lost.key,
        task_name=idem_notify.name,
        task_id=lost.task_id,
        fingerprint="f",
        window=60,
        owner="dead",
        lease=0.01,
    )
    services.finish_item(run.pk, lost.pk, BulkRunItem.Status.FAILED, error_class="lost")
    services.start_item(run.pk, done.pk, mark_run=True)
    services.finish_item(run.pk, done.pk, BulkRunItem.Status.SUCCEEDED)
    child = retry_failed(run, initiator="ops")
    (item,) = BulkRunItem.objects.filter(run=child)
    assert (child.total, item.status, item.kwargs["employee_id"]) == (1, "pending", 0)
    assert DatabaseLedger().get(lost.key)["task_id"] == item.task_id  # claimed by the retry


def test_the_sweep_publishes_items_a_dead_publisher_left(redis_url, queues, monkeypatch, settings):
    # The process dies after the commit, before publishing anything.
    monkeypatch.setattr(launch, "publish_items", lambda run: 0)
    run = start_run(run_item, [{"n": n} for n in range(30)])
    monkeypatch.undo()
    assert queue_length(redis_url, queues["high"]) == 0
    assert launch.sweep() == {"items": 0, "completions": 0}  # inside the grace: not yet
    settings.CELERY_GUARD_RUNS_SWEEP_GRACE = 0
    assert launch.sweep()["items"] == 30
    assert queue_length(redis_url, queues["high"]) == 30
    assert launch.sweep()["items"] == 0
    run.refresh_from_db()
    assert run.published


def test_the_sweep_settles_items_whose_message_is_gone(redis_url, queues, monkeypatch, settings):
    run = start_run(run_item, [{"n": n} for n in range(5)], on_complete=run_complete.si("r"))
    items = list(BulkRunItem.objects.filter(run=run).order_by("seq"))
    store = DatabaseLedger()

    def worker_took(item, lease=60.0):
        services.start_item(run.pk, item.pk, mark_run=True)
        return store.start(
            item.key,
            task_name=run_item.name,
            task_id=item.task_id,
            fingerprint="f",
            window=60,
            owner=f"w{item.seq}",
            lease=lease,
        )

    # 0: committed its effect, then its worker was SIGKILLed before recording it.
    started = worker_took(items[0])
    store.finish(items[0].key, owner="w0", token=started.fencing_token, state="succeeded")
    # 1: its worker was SIGKILLed mid-run and the message was lost (no redelivery came).
    worker_took(items[1], lease=0.01)
    # 2: published, never started: the message was lost on the way.
    # 3: dead-lettered, and the outcome could not be written.
    started = worker_took(items[3])
    store.finish(items[3].key, owner="w3", token=started.fencing_token, state="failed")
    letter = DeadLetter.objects.create(
        task_name=run_item.name, task_id=items[3].task_id, reason="exhausted", exception_class="E"
    )
    # 4: running now, under a live lease.
    worker_took(items[4])
    assert launch.reconcile() == dict.fromkeys(("republished", "succeeded", "skipped", "failed"), 0)
    # Past the time a message may take to come back (visibility, start grace, sweep grace).
    settings.CELERY_GUARD_RUNS_SWEEP_GRACE = 0
    monkeypatch.setattr(dedup, "start_within", lambda task, delay: 0.0)
    time.sleep(0.05)
    assert launch.reconcile() == {"republished": 2, "succeeded": 1, "skipped": 0, "failed": 1}
    statuses = dict(BulkRunItem.objects.filter(run=run).values_list("seq", "status"))
    assert statuses == {0: "succeeded", 1: "running", 2: "pending", 3: "failed", 4: "running"}
    assert BulkRunItem.objects.get(pk=items[3].pk).dead_letter_id == letter.pk
    assert queue_length(redis_url, queues["high"]) == 5 + 2  # 1 and 2 published again
    # A message lost again and again: past max_attempts + MAX_WORKER_LOST the item fails.
    BulkRunItem.objects.filter(pk=items[1].pk).update(attempts=100)
    assert launch.sweep() == {"items": 1, "completions": 0}  # 2, once more (still not started)
    failed = BulkRunItem.objects.get(pk=items[1].pk)
    assert (failed.status, failed.error_class) == ("failed", launch.MESSAGE_LOST)
    # The last two end: the run is final and its completion published once.
    for item in (items[2], items[4]):
        services.start_item(run.pk, item.pk, mark_run=False)
        services.finish_item(run.pk, item.pk, BulkRunItem.Status.SUCCEEDED)
    run.refresh_from_db()
    assert (run.status, run.succeeded, run.failed, run.pending) == (
        "completed_with_errors",
        3,
        2,
        0,
    )


def test_cancel_cancels_pending_items_ends_the_run_and_publishes_the_completion(redis_url, queues):
    run = start_run(run_item, [{"n": n} for n in range(10)], on_complete=run_complete.si("c"))
    services.start_item(run.pk, BulkRunItem.objects.get(run=run, seq=0).pk, mark_run=True)
    assert cancel(run, initiator="ops") == 9
    run.refresh_from_db()
    assert (run.status, run.cancelled, run.pending, run.finished_at) == ("cancelled", 9, 1, None)
    item = BulkRunItem.objects.get(run=run, seq=0)
    moved, finished = services.finish_item(run.pk, item.pk, BulkRunItem.Status.SUCCEEDED)
    assert (moved, finished) == (True, True)
    # A second report of the same item counts nothing.
    assert services.finish_item(run.pk, item.pk, BulkRunItem.Status.FAILED) == (False, False)
    launch.complete_quietly(run.pk)
    run.refresh_from_db()
    assert (run.status, run.succeeded, run.cancelled, run.pending) == ("cancelled", 1, 9, 0)
    assert run.completion_published_at is not None
    assert queue_length(redis_url, queues["high"]) == 10 + 1
    assert cancel(run) == 0


def test_purge_deletes_finished_runs_past_the_retention(settings):
    old = start_run(run_item, [{"n": 1}])
    cancel(old)
    recent = start_run(run_item, [{"n": 1}])
    cancel(recent)
    live = start_run(run_item, [{"n": 1}])
    BulkRun.objects.filter(pk=old.pk).update(finished_at=timezone.now() - dt.timedelta(days=31))
    call_command("celery_guard", "purge")
    assert set(BulkRun.objects.values_list("pk", flat=True)) == {recent.pk, live.pk}
    assert not BulkRunItem.objects.filter(run_id=old.pk).exists()
    settings.CELERY_GUARD_RUNS_RETENTION_DAYS = 0.0000001
    call_command("celery_guard", "purge")
    assert set(BulkRun.objects.values_list("pk", flat=True)) == {live.pk}


def test_the_runs_command_lists_watches_and_sweeps(settings):
    import io

    run = start_run(run_item, [{"n": 1}, {"n": 2}], name="Salary update")
    cancel(run)
    out = io.StringIO()
    call_command("celery_guard", "runs", stdout=out)
    assert f"{run.pk}  cancelled" in out.getvalue()
    assert "2/2" in out.getvalue() and "Salary update" in out.getvalue()
    out = io.StringIO()
    call_command("celery_guard", "runs", "watch", str(run.pk), stdout=out)
    assert "] 2/2 succeeded 0 failed 0 cancelled" in out.getvalue()
    out = io.StringIO()
    call_command("celery_guard", "runs", "sweep", stdout=out)
    assert "published 0 item(s) and 0 completion(s)" in out.getvalue()


def test_invalid_runs_settings_are_e001(settings):
    from celery_guard.runs.checks import check_setting_values

    settings.CELERY_GUARD_RUNS_RETENTION_DAYS = 0
    settings.CELERY_GUARD_RUNS_SWEEP_GRACE = "soon"
    errors = [e.msg for e in check_setting_values() if e.id == "celery_guard.E001"]
    assert len(errors) == 2
    assert "RUNS_RETENTION_DAYS" in errors[0] and "RUNS_SWEEP_GRACE" in errors[1]


def test_a_deferred_delivery_of_an_item_is_not_counted_as_an_attempt():
    from types import SimpleNamespace

    from celery_guard.exceptions import Deferral
    from celery_guard.runs import outcomes

    run = start_run(run_item, [{"n": 1}], name="deferred")
    item = BulkRunItem.objects.get(run=run)
    task = SimpleNamespace(name=run_item.name, request=SimpleNamespace(id=item.task_id))

    def deferred(**kwargs):
        raise Deferral("throttled by mail-gateway", when=1.0)

    for _ in range(3):
        with pytest.raises(Deferral):
            outcomes.run_item(task, run.pk, item.pk, lambda: deferred(n=1))
    item.refresh_from_db()
    assert (item.status, item.attempts) == ("running", 0)
    outcomes.run_item(task, run.pk, item.pk, lambda: None)
    item.refresh_from_db()
    assert (item.status, item.attempts) == ("succeeded", 1)


def _delivery(run, seq, body=lambda **kwargs: None):
    """One delivery of an item through the runs step's worker side (no broker), to call."""
    from types import SimpleNamespace

    from celery_guard.runs import outcomes

    item = BulkRunItem.objects.get(run=run, seq=seq)
    task = SimpleNamespace(name=run_item.name, request=SimpleNamespace(id=item.task_id))
    return lambda: outcomes.run_item(task, run.pk, item.pk, lambda: body(**item.kwargs))


def test_an_item_costs_the_worker_two_statements_on_postgresql():
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    def fails(**kwargs):
        raise ValueError("no gateway")

    run = start_run(run_item, [{"n": n} for n in range(4)], name="statements")
    deliveries = [_delivery(run, 0), _delivery(run, 1), _delivery(run, 2, fails)]
    deliveries[0]()  # the first item of a run in a process also marks the run running
    with CaptureQueriesContext(connection) as succeeded:
        deliveries[1]()
    with CaptureQueriesContext(connection) as failed, pytest.raises(ValueError):
        deliveries[2]()
    run.refresh_from_db()
    assert (run.status, run.succeeded, run.failed, run.pending) == ("running", 2, 1, 1)
    # PostgreSQL: the start, then the outcome and the run's counters in one statement (and
    # the dead letter's lookup for a failure). SQLite: BEGIN IMMEDIATE, three statements, COMMIT.
    expected = (2, 3) if connection.vendor == "postgresql" else (6, 7)
    assert (len(succeeded), len(failed)) == expected, [q["sql"][:40] for q in failed]


def _together(calls):
    """Run the calls on threads of their own (each its own connection), released at once."""
    import threading

    from django.db import connection

    gate = threading.Barrier(len(calls))
    results = [None] * len(calls)

    def work(index, call):
        try:
            gate.wait(10)
            results[index] = call()
        finally:
            connection.close()

    threads = [threading.Thread(target=work, args=(i, c)) for i, c in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


def test_two_last_items_recorded_at_the_same_moment_finish_the_run_once():
    done = BulkRunItem.Status.SUCCEEDED
    for attempt in range(15):
        run = start_run(run_item, [{"n": n} for n in range(3)], on_complete=run_complete.si("r"))
        first, *last_two = BulkRunItem.objects.filter(run=run).order_by("seq")
        assert services.finish_item(run.pk, first.pk, done) == (True, False)
        outcomes = _together(
            [
                lambda run_id=run.pk, pk=last_two[0].pk: services.finish_item(run_id, pk, done),
                lambda run_id=run.pk, pk=last_two[1].pk: services.finish_item(
                    run_id, pk, BulkRunItem.Status.FAILED, error_class="x.Y"
                ),
            ]
        )
        assert sorted(outcomes) == [(True, False), (True, True)], (attempt, outcomes)
        run.refresh_from_db()
        assert (run.status, run.succeeded, run.failed, run.pending) == (
            "completed_with_errors",
            2,
            1,
            0,
        )
        assert run.completion_claimed_at == run.finished_at is not None


def test_counters_are_exact_when_many_reports_race_including_duplicates_and_a_cancel():
    statuses = [BulkRunItem.Status.SUCCEEDED, BulkRunItem.Status.FAILED, BulkRunItem.Status.SKIPPED]
    run = start_run(run_item, [{"n": n} for n in range(120)], on_complete=run_complete.si("m"))
    items = list(BulkRunItem.objects.filter(run=run).order_by("seq").values_list("pk", flat=True))
    for pk in items[:80]:
        services.start_item(run.pk, pk, mark_run=False)

    def reporter(offset):
        # Every running item reported twice (a redelivery), with different outcomes.
        def report():
            return [
                services.finish_item(run.pk, pk, statuses[(i + offset) % 3])
                for i, pk in enumerate(items[:80])
            ]

        return report

    results = _together([reporter(0), reporter(1), lambda: services.cancel(run, initiator="ops")])
    reports = results[0] + results[1]
    assert sum(moved for moved, _ in reports) == 80
    run.refresh_from_db()
    cancelled, cancel_finished = results[2]
    assert cancelled == 40  # the pending ones
    assert run.succeeded + run.failed + run.skipped == 80
    assert (run.cancelled, run.pending, run.status) == (40, 0, "cancelled")
    # One of the 162 calls ended the run: the last report, or the cancel if it came last.
    assert sum(finished for _, finished in reports) + cancel_finished == 1
    by_status = collections.Counter(
        BulkRunItem.objects.filter(run=run).values_list("status", flat=True)
    )
    assert by_status["succeeded"] == run.succeeded and by_status["failed"] == run.failed
    assert by_status["skipped"] == run.skipped and by_status["cancelled"] == 40


def test_the_asynchronous_commit_of_item_writes_never_covers_a_caller_transaction():
    from django.db import connection, transaction

    run = start_run(run_item, [{"n": n} for n in range(2)], name="quick")
    first, second = BulkRunItem.objects.filter(run=run).order_by("seq")
    done = BulkRunItem.Status.SUCCEEDED

    def commits_synchronously():
        if connection.vendor != "postgresql":
            return True  # SQLite: no such setting; the portable path's transaction
        with connection.cursor() as cursor:
            cursor.execute("SHOW synchronous_commit")
            return cursor.fetchone()[0] == "on"

    with transaction.atomic():
        assert services.start_item(run.pk, first.pk, mark_run=False)
        assert services.finish_item(run.pk, first.pk, done) == (True, False)
        assert commits_synchronously()  # the caller's transaction commits as it would have
    # Autocommitted: each write is its own transaction (on PostgreSQL committed without
    # waiting for the disk, a setting of that transaction only).
    assert services.start_item(run.pk, second.pk, mark_run=False)
    assert services.finish_item(run.pk, second.pk, done) == (True, True)
    assert commits_synchronously()
    run.refresh_from_db()
    assert (run.status, run.succeeded, run.pending) == ("succeeded", 2, 0)


def test_the_worker_statements_are_prepared_per_session_and_a_lost_one_runs_unprepared(caplog):
    from django.db import connection

    def prepared():
        if connection.vendor != "postgresql":
            return set()
        with connection.cursor() as cursor:
            cursor.execute("SELECT name FROM pg_prepared_statements")
            return {name for (name,) in cursor.fetchall()}

    run = start_run(run_item, [{"n": n} for n in range(4)], name="prepared")
    items = list(BulkRunItem.objects.filter(run=run).order_by("seq").values_list("pk", flat=True))
    done, failed = BulkRunItem.Status.SUCCEEDED, BulkRunItem.Status.FAILED
    connection.close()  # a new session
    assert services.start_item(run.pk, items[0], mark_run=True)
    assert services.finish_item(run.pk, items[0], done) == (True, False)
    assert services.start_item(run.pk, items[1], mark_run=False)
    assert services.finish_item(run.pk, items[1], failed, error_class="x.Y") == (True, False)
    assert services.finish_item(run.pk, items[1], done) == (False, False)  # final already
    if connection.vendor == "postgresql":
        assert prepared() >= {
            "celery_guard_item_start",
            "celery_guard_item_succeeded",
            "celery_guard_item_failed",
        }
        with connection.cursor() as cursor:
            cursor.execute("DEALLOCATE ALL")  # the session loses them (a pooler's reset)
    assert services.start_item(run.pk, items[2], mark_run=False)
    assert services.finish_item(run.pk, items[2], done) == (True, False)
    assert services.start_item(run.pk, items[3], mark_run=False)
    assert services.finish_item(run.pk, items[3], done) == (True, True)
    assert not services.start_item(run.pk, items[3], mark_run=False)  # final: not run again
    assert prepared() == set()  # this session prepares nothing any more
    run.refresh_from_db()
    assert (run.status, run.succeeded, run.failed, run.pending) == (
        "completed_with_errors",
        3,
        1,
        0,
    )
    attempts = BulkRunItem.objects.filter(run=run).values_list("attempts", flat=True)
    assert list(attempts.order_by("seq")) == [1, 1, 1, 1]
    assert run.completion_claimed_at is None and run.finished_at is not None


def test_a_worker_keeps_one_cursor_per_session_for_its_item_writes():
    from unittest import mock

    from django.db import connection

    if connection.vendor != "postgresql":
        pytest.skip("the one-statement path (PostgreSQL); elsewhere the ORM's statements")
    run = start_run(run_item, [{"n": n} for n in range(4)], name="cursor")
    items = list(BulkRunItem.objects.filter(run=run).order_by("seq").values_list("pk", flat=True))
    done = BulkRunItem.Status.SUCCEEDED
    for first, *rest in (items[:3], items[3:]):
        connection.close()  # a new session: its first item prepares the statements
        assert services.start_item(run.pk, first, mark_run=False)
        assert services.finish_item(run.pk, first, done)[0]
        with mock.patch.object(connection, "create_cursor", wraps=connection.create_cursor) as made:
            for pk in rest:
                assert services.start_item(run.pk, pk, mark_run=False)
                assert services.finish_item(run.pk, pk, done) == (True, False)
        assert made.call_count == 0  # the session's cursor, not two new ones per item
    run.refresh_from_db()
    assert (run.status, run.succeeded, run.pending) == ("succeeded", 4, 0)


def test_outcomes_with_and_without_a_note_record_their_own_fields_and_times():
    run = start_run(run_item, [{"n": n} for n in range(4)], name="notes")
    items = list(BulkRunItem.objects.filter(run=run).order_by("seq").values_list("pk", flat=True))
    done, failed = BulkRunItem.Status.SUCCEEDED, BulkRunItem.Status.FAILED
    before = timezone.now()
    for pk in items:
        assert services.start_item(run.pk, pk, mark_run=False)
    assert services.finish_item(run.pk, items[0], done, error_message="ignored by the task")
    assert services.finish_item(run.pk, items[1], done) == (True, False)
    assert services.finish_item(run.pk, items[2], failed, error_class="x.Y", error_message="no")
    assert services.finish_item(run.pk, items[3], done) == (True, True)
    after = timezone.now()
    rows = BulkRunItem.objects.filter(run=run).order_by("seq")
    fields = [(i.status, i.error_class, i.error_message, i.attempts) for i in rows]
    assert fields == [
        ("succeeded", "", "ignored by the task", 1),
        ("succeeded", "", "", 1),
        ("failed", "x.Y", "no", 1),
        ("succeeded", "", "", 1),
    ]
    for item in rows:
        assert before <= item.started_at <= item.finished_at <= after
    run.refresh_from_db()
    assert (run.status, run.succeeded, run.failed) == ("completed_with_errors", 3, 1)
    assert before <= run.finished_at <= after
