"""Bulk runs without workers: validation before anything is written, sweep, cancel, purge."""

import datetime as dt

import pytest
from django.core.management import call_command
from django.utils import timezone

from celery_guard import RunItemError, start_run
from celery_guard.models import BulkRun, BulkRunItem
from celery_guard.runs import cancel, launch, services
from tests.support.harness import queue_length
from tests.testapp.run_tasks import run_complete, run_item

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
