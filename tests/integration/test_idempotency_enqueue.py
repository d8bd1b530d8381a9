"""Enqueue-time dedup on the real Redis broker, transactional completion, release and purge."""

import logging
import time

import pytest
from django.core.management import call_command
from django.db import transaction
from django.test import override_settings

from celery_guard import IdempotencyConflict, IdempotencyKeyError, LeaseLost
from celery_guard.idempotency import dedup, ledger
from celery_guard.models import IdempotencyRecord
from celery_guard.signals import dead_lettered
from celery_guard.tasks import purge_idempotency_records
from tests.support.harness import queue_length
from tests.testapp.dlq_tasks import dlq_plain
from tests.testapp.idem_tasks import idem_atomic, idem_fail, idem_notify
from tests.testapp.models import Execution

pytestmark = pytest.mark.django_db(transaction=True)

NOTIFY = idem_notify.name


def high(redis_url, queues):
    return queue_length(redis_url, queues["high"])


def test_duplicates_inside_the_window_return_the_first_task(
    idem_backend, idem_store, redis_url, queues, empty_queues, caplog
):
    caplog.set_level(logging.INFO, logger="celery_guard")
    first = idem_notify.delay(1, "v1")
    again = idem_notify.delay(1, "v1")
    keyword = idem_notify.apply_async(kwargs={"employee_id": 1, "event_version": "v1"})
    assert again.id == first.id and keyword.id == first.id
    assert high(redis_url, queues) == 1
    other = idem_notify.delay(1, "v2")
    assert other.id != first.id
    assert high(redis_url, queues) == 2
    record = idem_store.get(f"{NOTIFY}:notify:1:v1")
    assert (record["state"], record["task_id"]) == ("pending", first.id)
    assert f"not published: key '{NOTIFY}:notify:1:v1' is held by {first.id}" in caplog.text


def test_the_result_says_whether_the_call_was_deduplicated(
    idem_backend, idem_store, redis_url, queues, empty_queues
):
    first = idem_notify.delay(11, "v1")
    again = idem_notify.apply_async((11, "v1"))
    ignored = idem_notify.apply_async(
        (11, "v1"), {"note": "b"}, guard={"idempotency_conflict": "ignore"}
    )
    other = idem_notify.delay(11, "v2")
    unkeyed = dlq_plain.delay("no key")
    assert first.deduplicated is False and other.deduplicated is False
    assert again.deduplicated is True and again.id == first.id
    assert ignored.deduplicated is True and ignored.id == first.id
    assert unkeyed.deduplicated is False
    assert high(redis_url, queues) == 2


def test_conflicting_arguments_raise_and_publish_nothing(
    idem_backend, idem_store, redis_url, queues, empty_queues
):
    first = idem_notify.delay(2, "v1", note="a")
    with pytest.raises(IdempotencyConflict, match=f"already used by task {first.id}") as exc:
        idem_notify.delay(2, "v1", note="b")
    assert (exc.value.key, exc.value.task_id) == (f"{NOTIFY}:notify:2:v1", first.id)
    assert high(redis_url, queues) == 1
    ignored = idem_notify.apply_async(
        (2, "v1"), {"note": "b"}, guard={"idempotency_conflict": "ignore"}
    )
    assert ignored.id == first.id
    assert high(redis_url, queues) == 1


def test_key_errors_raise_before_anything_is_claimed_or_published(
    idem_backend, idem_store, redis_url, queues, empty_queues
):
    with pytest.raises(IdempotencyKeyError, match="no value for 'employee_id'"):
        idem_notify.delay(None, "v1")
    with pytest.raises(IdempotencyKeyError, match="missing a required argument"):
        idem_notify.apply_async(kwargs={"event_version": "v1"})
    with pytest.raises(IdempotencyKeyError), transaction.atomic():
        idem_notify.delay_on_commit(None, "v1")
    assert high(redis_url, queues) == 0
    assert IdempotencyRecord.objects.count() == 0
    assert idem_store.get(f"{NOTIFY}:notify:None:v1") is None


def test_a_failed_publish_releases_its_claim(
    idem_backend, idem_store, redis_url, queues, empty_queues, monkeypatch
):
    from celery.app.base import Celery

    def broker_down(*args, **kwargs):
        raise ConnectionError("broker down")

    with monkeypatch.context() as patch:
        patch.setattr(Celery, "send_task", broker_down)
        with pytest.raises(ConnectionError):
            idem_notify.delay(3, "v1")
    assert idem_store.get(f"{NOTIFY}:notify:3:v1")["state"] == "released"
    result = idem_notify.delay(3, "v1")
    assert high(redis_url, queues) == 1
    assert idem_store.get(f"{NOTIFY}:notify:3:v1")["task_id"] == result.id


def test_per_call_key_and_window(idem_backend, idem_store, redis_url, queues, empty_queues):
    first = idem_notify.apply_async((4, "v1"), guard={"idempotency_key": "order-4"})
    second = idem_notify.apply_async((4, "v1"), guard={"idempotency_key": "order-4"})
    assert second.id == first.id
    assert idem_store.get(f"{NOTIFY}:order-4")["task_id"] == first.id
    short = idem_notify.apply_async((5, "v1"), guard={"dedup_window": 0.2})
    time.sleep(0.3)
    assert idem_notify.delay(5, "v1").id != short.id  # the window is over
    assert high(redis_url, queues) == 3


def run(task, *args, **kwargs):
    return task.apply(args, kwargs)


def test_transactional_completion_commits_effect_and_ledger_together():
    result = run(idem_atomic, "ok")
    assert result.successful(), result.traceback
    record = IdempotencyRecord.objects.get()
    assert (record.state, record.task_id, record.fencing_token) == ("succeeded", result.id, 1)
    assert Execution.objects.filter(label="ok").count() == 1
    assert run(idem_atomic, "ok").successful()  # a second delivery is skipped
    assert Execution.objects.filter(label="ok").count() == 1


def test_transactional_completion_rolls_back_effect_and_ledger_together():
    result = run(idem_atomic, "bad", fail=True)
    assert result.failed()
    assert Execution.objects.count() == 0
    assert IdempotencyRecord.objects.get().state == "failed"  # not succeeded: it may run again


def test_a_stale_owner_cannot_complete_and_its_effect_rolls_back():
    idem_store = ledger.DatabaseLedger()
    key = "t:stale"
    args = {"task_name": "t", "task_id": "t1", "fingerprint": "f", "window": 60}
    stale = idem_store.start(key, owner="w1", lease=0.1, **args)
    time.sleep(0.2)
    new = idem_store.start(key, owner="w2", lease=60, **args)
    assert new.fencing_token > stale.fencing_token
    ctx = dedup.RunContext(key, stale.fencing_token, "w1", "t1", idem_store)
    with pytest.raises(LeaseLost), ctx.atomic():
        Execution.objects.create(
            task="t", label="stale", queue="", hostname="", started_at=0, finished_at=0
        )
    assert Execution.objects.count() == 0
    fresh = dedup.RunContext(key, new.fencing_token, "w2", "t1", idem_store)
    with fresh.atomic():
        Execution.objects.create(
            task="t", label="new", queue="", hostname="", started_at=0, finished_at=0
        )
    assert list(Execution.objects.values_list("label", flat=True)) == ["new"]
    assert idem_store.get(key)["state"] == "succeeded"


@pytest.mark.parametrize("idem_backend", ["redis"], indirect=True)
def test_transactional_completion_needs_the_database_ledger(idem_backend):
    result = run(idem_atomic, "redis")
    assert result.failed()
    assert isinstance(result.result, TypeError)
    assert "CELERY_GUARD_IDEMPOTENCY_BACKEND = 'database'" in str(result.result)


@pytest.mark.parametrize("release", [True, False])
def test_dead_lettered_runs_release_their_key(
    release, idem_backend, idem_store, redis_url, queues, empty_queues
):
    failed = idem_notify.delay(6, "v1")
    key = f"{NOTIFY}:notify:6:v1"
    fp = idem_store.get(key)["fingerprint"]
    idem_store.start(
        key, task_name=NOTIFY, task_id=failed.id, fingerprint=fp, window=60, owner="w", lease=60
    )
    idem_store.finish(key, owner="w", token=1, state="failed")
    assert idem_notify.delay(6, "v1").id == failed.id  # a failed key still blocks
    with override_settings(CELERY_GUARD_RELEASE_ON_DEAD_LETTER=release):
        dead_lettered.send(
            sender=None,
            task_name=NOTIFY,
            task_id=failed.id,
            idempotency_key=key,
            reason="max retries exceeded",
        )
    resubmitted = idem_notify.delay(6, "v1")
    assert (resubmitted.id != failed.id) is release
    assert high(redis_url, queues) == (2 if release else 1)


def test_a_failing_body_marks_its_key_failed():
    result = run(idem_fail, "x")
    assert result.failed()
    assert IdempotencyRecord.objects.get().state == "failed"


def test_purge_command_and_periodic_task_delete_expired_records(settings):
    idem_store = ledger.DatabaseLedger()
    for key in ("t:a", "t:b"):
        idem_store.claim(key, task_name="t", task_id=key, fingerprint="f", window=0.1)
    idem_store.claim("t:live", task_name="t", task_id="l", fingerprint="f", window=60)
    time.sleep(0.2)
    settings.CELERY_GUARD_IDEMPOTENCY_RETENTION = 3600
    call_command("celery_guard", "purge")
    assert IdempotencyRecord.objects.count() == 3  # inside the retention
    settings.CELERY_GUARD_IDEMPOTENCY_RETENTION = 0.01
    from io import StringIO

    out = StringIO()
    call_command("celery_guard", "purge", stdout=out)
    assert "purged 2 expired idempotency record(s)" in out.getvalue()
    idem_store.claim("t:c", task_name="t", task_id="c", fingerprint="f", window=0.1)
    time.sleep(0.2)
    assert purge_idempotency_records.apply().get() == 1
    assert list(IdempotencyRecord.objects.values_list("key", flat=True)) == ["t:live"]


def test_an_eager_run_whose_key_is_held_by_a_live_owner_does_not_run(
    idem_backend, idem_store, redis_url, queues, empty_queues
):
    key = f"{NOTIFY}:notify:11:v1"
    idem_store.start(
        key, task_name=NOTIFY, task_id="holder", fingerprint="f", window=60, owner="w", lease=30
    )
    result = run(idem_notify, 11, "v1")
    assert result.state == "RETRY"
    assert Execution.objects.count() == 0
    assert high(redis_url, queues) == 0
    assert idem_store.get(key)["owner"] == "w"


def test_an_enqueue_confirms_its_claim_once_published(
    idem_backend, idem_store, redis_url, queues, empty_queues, caplog, monkeypatch
):
    first = idem_notify.delay(40, "v1")
    record = idem_store.get(f"{NOTIFY}:notify:40:v1")
    assert (record["state"], record["task_id"], record["owner"]) == ("pending", first.id, "")
    assert record["lease_expires_at"] is None  # confirmed: no publish deadline any more

    # A confirm that fails after the publish does not fail the call: the message is out,
    # and an unconfirmed claim only risks a duplicate publish after the grace.
    def broken(self, key, task_id):
        raise ConnectionError("ledger down")

    monkeypatch.setattr(type(idem_store), "confirm", broken)
    caplog.set_level(logging.WARNING, logger="celery_guard")
    second = idem_notify.delay(41, "v1")
    assert high(redis_url, queues) == 2
    assert f"[{second.id}] published but its claim of key" in caplog.text
    assert idem_store.get(f"{NOTIFY}:notify:41:v1")["lease_expires_at"] is not None


def test_a_published_key_must_start_by_its_eta_plus_the_visibility_timeout_and_grace(
    idem_backend, idem_store, queues, empty_queues, celery_conf, settings
):
    import datetime as dt

    from django.utils import timezone

    settings.CELERY_GUARD_IDEMPOTENCY_START_GRACE = 300
    celery_conf(broker_transport_options={"visibility_timeout": 7200})
    before = timezone.now()
    idem_notify.apply_async((3, "v1"), countdown=3600)
    idem_notify.apply_async((3, "v2"), eta=before + dt.timedelta(hours=2))
    for version, delay in (("v1", 3600), ("v2", 7200)):
        start_by = idem_store.get(f"{NOTIFY}:notify:3:{version}")["start_by"]
        assert start_by >= before + dt.timedelta(seconds=delay + 7200 + 300)
        assert start_by < before + dt.timedelta(seconds=delay + 7200 + 300 + 60)
