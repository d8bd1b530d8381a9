"""The replay service on the real broker: validation, once-only publish, headers, pacing.

No worker runs here: what was published is read back from the Redis queue itself.
"""

import datetime as dt
import logging
import threading
import time
from types import SimpleNamespace

import pytest
from celery import states
from celery.exceptions import Reject
from django.contrib.admin.models import LogEntry
from django.contrib.auth.models import User
from django.core.paginator import InvalidPage
from django.db import DatabaseError, connection
from django.utils import timezone

from bench import seed as seeding
from celery_guard.core import redaction
from celery_guard.dlq import receivers, records, replay, services
from celery_guard.dlq.scale import (
    EstimatedCountPaginator,
    ProbedDatesQuerySet,
    distinct_values,
)
from celery_guard.models import DeadLetter, DeadLetterReplay
from tests.celery_app import app
from tests.support.checks import check_setting_values
from tests.support.dlq import UNTIL_FIXED, dead_letter, published
from tests.support.harness import queue_length
from tests.testapp import dlq_tasks

pytestmark = pytest.mark.usefixtures("empty_queues")


@pytest.mark.django_db
def test_replay_publishes_a_fresh_first_attempt_naming_the_dead_letter(redis_url, queues):
    row = dead_letter("fresh", kwargs={"note": "n"})
    alice = User.objects.create_user("alice")
    before = time.time()
    summary = replay.Summary()
    outcome = replay.replay_one(row, app=app, user=alice, summary=summary)
    assert outcome == replay.REPLAYED
    [(message_headers, args, kwargs)] = published(redis_url, queues["default"])
    guard = message_headers["celery_guard"]
    assert guard["attempt"] == 1
    assert guard["first_enqueued_at"] >= before
    assert guard["replay_of"] == row.pk
    assert guard["priority"] == "default"
    assert "consumed" not in guard and "history" not in guard
    assert message_headers["task"] == UNTIL_FIXED
    assert message_headers["id"] == summary.task_ids[row.pk]
    assert (args, kwargs) == (["fresh"], {"note": "n"})
    row.refresh_from_db()
    assert row.status == DeadLetter.Status.REPLAYED
    [record] = row.replays.all()
    assert (record.task_id, record.replayed_by, record.edited) == (
        summary.task_ids[row.pk],
        "alice",
        False,
    )
    # Audited in the admin log in the claim's transaction.
    [entry] = LogEntry.objects.filter(object_id=str(row.pk))
    assert entry.user == alice and record.task_id in entry.change_message


@pytest.mark.django_db
def test_replaying_again_publishes_nothing(redis_url, queues):
    row = dead_letter("twice")
    assert replay.replay_one(row, app=app) == replay.REPLAYED
    # The same stale object (a double submit) and a fresh one: both skipped.
    assert replay.replay_one(row, app=app) == replay.SKIPPED
    row.refresh_from_db()
    assert replay.replay_one(row, app=app) == replay.SKIPPED
    assert queue_length(redis_url, queues["default"]) == 1
    assert DeadLetterReplay.objects.count() == 1


@pytest.mark.django_db(transaction=True)
def test_two_operators_at_once_publish_once(redis_url, queues):
    rows = [dead_letter(f"race{n}") for n in range(5)]
    barrier = threading.Barrier(2)
    results = []

    def operator():
        loaded = list(DeadLetter.objects.filter(pk__in=[r.pk for r in rows]))
        barrier.wait()
        try:
            summary = replay.Summary()
            for row in loaded:
                replay.replay_one(row, app=app, summary=summary)
            results.append(summary)
        finally:
            connection.close()

    threads = [threading.Thread(target=operator) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    summaries = results
    assert sum(s.replayed for s in summaries) == 5
    assert sum(s.skipped for s in summaries) == 5
    assert queue_length(redis_url, queues["default"]) == 5
    assert DeadLetterReplay.objects.count() == 5


@pytest.mark.django_db
def test_unknown_task_is_unroutable_and_nothing_is_published(redis_url, queues):
    row = dead_letter("gone", task_name="tests.testapp.dlq_tasks.removed_task")
    summary = replay.Summary()
    assert replay.replay_one(row, app=app, summary=summary) == replay.UNROUTABLE
    row.refresh_from_db()
    assert row.status == DeadLetter.Status.UNROUTABLE
    assert "not registered" in row.status_reason
    assert summary.reasons[row.pk] == row.status_reason
    assert queue_length(redis_url, queues["default"]) == 0
    assert not DeadLetterReplay.objects.exists()


@pytest.mark.django_db
def test_arguments_that_no_longer_bind_are_unroutable(redis_url, queues):
    row = dead_letter("old", kwargs={"removed_parameter": 1})
    assert replay.replay_one(row, app=app) == replay.UNROUTABLE
    row.refresh_from_db()
    assert "removed_parameter" in row.status_reason
    assert queue_length(redis_url, queues["default"]) == 0


def test_signature_check_ignores_self_of_bound_tasks():
    bound, plain = dlq_tasks.dlq_until_fixed, dlq_tasks.dlq_plain
    assert replay.signature_error(bound, ["label"], {"note": "x"}) is None
    assert replay.signature_error(bound, [], {}) is not None
    assert replay.signature_error(bound, ["a", "b", "c"], {}) is not None
    assert replay.signature_error(plain, ["label", 2], {}) is None
    assert replay.signature_error(plain, ["label"], {"nope": 1}) is not None
    assert replay.signature_error(plain, "label", {}) is not None


@pytest.mark.django_db
def test_a_failed_publish_undoes_the_claim(monkeypatch, redis_url, queues):
    row = dead_letter("broker-down")

    def refuse(*args, **kwargs):
        raise ConnectionError("broker down")

    monkeypatch.setattr(app, "send_task", refuse)
    with pytest.raises(ConnectionError):
        replay.replay_one(row, app=app)
    row.refresh_from_db()
    assert row.status == DeadLetter.Status.DEAD
    assert not DeadLetterReplay.objects.exists()
    monkeypatch.undo()
    assert replay.replay_one(row, app=app) == replay.REPLAYED
    assert queue_length(redis_url, queues["default"]) == 1


@pytest.mark.django_db
def test_a_batch_goes_out_in_one_round_trip_and_a_failed_one_undoes_its_claim(
    monkeypatch, redis_url, queues
):
    import redis
    from kombu.exceptions import BatchPublishError

    rows = [dead_letter(f"piped{n}") for n in range(3)]
    pushes = []
    execute = redis.client.Pipeline.execute

    def refuse(pipe, *args, **kwargs):
        pushes.append(len(pipe.command_stack))
        raise redis.ConnectionError("broker gone at the flush")

    monkeypatch.setattr(redis.client.Pipeline, "execute", refuse)
    with pytest.raises(BatchPublishError):  # delivery uncertain: nothing is marked replayed
        replay.replay([r.pk for r in rows], app=app)
    assert pushes == [3]  # the three messages, buffered into one pipeline
    assert not DeadLetterReplay.objects.exists()
    assert set(DeadLetter.objects.values_list("status", flat=True)) == {DeadLetter.Status.DEAD}

    monkeypatch.setattr(redis.client.Pipeline, "execute", execute)
    summary = replay.replay([r.pk for r in rows], app=app)
    assert summary.replayed == 3
    assert queue_length(redis_url, queues["default"]) == 3


@pytest.mark.django_db
def test_edited_arguments_are_published_and_recorded(redis_url, queues):
    row = dead_letter("orig", status=DeadLetter.Status.UNROUTABLE)
    outcome = replay.replay_one(
        row,
        app=app,
        args=["edited"],
        kwargs={"note": "by hand"},
    )
    assert outcome == replay.REPLAYED
    [(_, args, kwargs)] = published(redis_url, queues["default"])
    assert (args, kwargs) == (["edited"], {"note": "by hand"})
    record = row.replays.get()
    assert record.edited and record.args == ["edited"]
    row.refresh_from_db()
    assert row.args == ["orig"]  # the stored arguments are untouched


@pytest.mark.django_db
def test_bulk_replay_counts(redis_url, queues):
    rows = [dead_letter(f"bulk{n}") for n in range(4)]
    gone = dead_letter("bulk-gone", task_name="nope.task")
    rows[0].status = DeadLetter.Status.DISCARDED
    rows[0].save()
    done = []
    summary = replay.replay(
        [r.pk for r in rows] + [gone.pk, 999_999], app=app, progress=done.append
    )
    assert (summary.replayed, summary.skipped, summary.unroutable) == (3, 2, 1)
    assert done == [6]  # after each batch
    assert queue_length(redis_url, queues["default"]) == 3


def test_a_slow_rate_makes_short_batches():
    # A batch holds its rows locked while it publishes: at most BATCH_SECONDS of a rate.
    assert replay.batch_size(None) == replay.BATCH
    assert replay.batch_size(10_000) == replay.BATCH
    assert replay.batch_size(20) == int(20 * replay.BATCH_SECONDS)
    assert replay.batch_size(0.1) == 1


@pytest.mark.django_db
def test_dry_run_changes_and_publishes_nothing(redis_url, queues, monkeypatch):
    ok, gone = dead_letter("dry"), dead_letter("dry-gone", task_name="nope.task")

    def no_broker():
        raise ConnectionError("a dry run must not need the broker")

    monkeypatch.setattr(app, "producer_or_acquire", no_broker)
    summary = replay.replay([ok.pk, gone.pk], app=app, dry_run=True)
    assert (summary.replayed, summary.unroutable) == (1, 1)
    assert set(DeadLetter.objects.values_list("status", flat=True)) == {"dead"}
    assert queue_length(redis_url, queues["default"]) == 0


def test_token_bucket_paces_to_the_rate():
    now = [0.0]
    slept = []

    def sleep(seconds):
        slept.append(seconds)
        now[0] += seconds

    bucket = replay.TokenBucket(10, clock=lambda: now[0], sleep=sleep)
    for _ in range(5):
        bucket.acquire()
    assert now[0] == pytest.approx(0.4)  # the first is free, then one every 0.1 s
    assert replay.parse_rate("200/s") == 200
    assert replay.parse_rate("60/m") == 1
    assert replay.parse_rate("36/h") == pytest.approx(0.01)
    assert replay.parse_rate("5") == 5
    for bad in ("0/s", "fast", "10/d", "-1"):
        with pytest.raises(ValueError):
            replay.parse_rate(bad)


def test_the_default_fields_cover_the_usual_secrets():
    kwargs = {
        "password": 1,
        "auth_token": 2,
        "client_secret": 3,
        "Authorization": 4,
        "api_key": 5,
        "card_number": 6,
        "ssn": 7,
        "name": "kept",
    }
    masked = redaction.redact([], kwargs)["kwargs"]
    assert masked == {**dict.fromkeys(kwargs, redaction.MASK), "name": "kept"}


def test_redaction_masks_sensitive_keys_case_insensitively(settings):
    data = redaction.redact(
        [{"Password": "p", "user": "u"}, ["x"]],
        {"access_token": "t", "nested": {"X-API_KEY": "k", "ok": 1}, "card_number": "4111"},
    )
    assert data == {
        "args": [{"Password": redaction.MASK, "user": "u"}, ["x"]],
        "kwargs": {
            "access_token": redaction.MASK,
            "nested": {"X-API_KEY": redaction.MASK, "ok": 1},
            "card_number": redaction.MASK,
        },
    }
    settings.CELERY_GUARD_REDACT_FIELDS = ["user"]
    assert redaction.redact([{"user": "u", "password": "p"}], {})["args"] == [
        {"user": redaction.MASK, "password": "p"}
    ]


def drop_emails(data, task_name):
    """A project redactor hook (dotted path in the test below)."""
    return {**data, "kwargs": {k: v for k, v in data["kwargs"].items() if k != "email"}}


def test_redactor_hook_runs_after_the_fields_and_fails_closed(settings):
    settings.CELERY_GUARD_REDACTOR = "tests.integration.test_dlq_replay.drop_emails"
    assert redaction.redact([], {"email": "a@b", "token": "t", "n": 1}) == {
        "args": [],
        "kwargs": {"token": redaction.MASK, "n": 1},
    }
    settings.CELERY_GUARD_REDACTOR = "tests.nowhere.hook"
    assert redaction.redact([1], {"n": 1}) == {"args": redaction.MASK, "kwargs": redaction.MASK}
    settings.CELERY_GUARD_REDACTOR = "tests.integration.test_dlq_replay.half_a_result"
    assert redaction.redact([1], {"n": 1}) == {"args": redaction.MASK, "kwargs": redaction.MASK}


def half_a_result(data, task_name):
    """A broken project redactor hook: it loses the args."""
    return {"kwargs": data["kwargs"]}


@pytest.mark.django_db
def test_a_broken_redactor_does_not_undo_a_published_replay(settings, redis_url, queues):
    settings.CELERY_GUARD_REDACTOR = "tests.integration.test_dlq_replay.half_a_result"
    row = dead_letter("hooked")
    assert replay.replay_one(row, app=app) == replay.REPLAYED
    assert replay.replay_one(row, app=app) == replay.SKIPPED
    assert queue_length(redis_url, queues["default"]) == 1


@pytest.mark.django_db
def test_a_replay_that_fails_again_links_to_its_dead_letter():
    failure = records.Failure(
        task_name=UNTIL_FIXED,
        task_id="t-again",
        reason="permanent",
        exception_class="builtins.ValueError",
        message="again",
        headers={"celery_guard": {"v": 1, "attempt": 1, "replay_of": 41}},
    )
    assert records.write(failure).replay_of == 41
    failure.headers = {"celery_guard": {"replay_of": "junk"}}
    assert records.write(failure).replay_of is None


@pytest.mark.django_db
def test_purge_deletes_only_old_replayed_and_discarded_rows(settings):
    old = timezone.now() - dt.timedelta(days=40)
    keep = [
        dead_letter("old-dead", failed_at=old),
        dead_letter("old-unroutable", failed_at=old, status="unroutable"),
        dead_letter("new-replayed", status="replayed"),
    ]
    dead_letter("old-replayed", failed_at=old, status="replayed")
    dead_letter("old-discarded", failed_at=old, status="discarded")
    assert services.purge() == 2  # default retention: 30 days
    assert set(DeadLetter.objects.values_list("pk", flat=True)) == {r.pk for r in keep}
    settings.CELERY_GUARD_DLQ_RETENTION_DAYS = 50
    dead_letter("x", failed_at=old, status="replayed")
    assert services.purge() == 0


@pytest.mark.django_db
def test_seed_filters_and_estimated_counts():
    assert seeding.seed(60, batch=25) == 60
    names = distinct_values(DeadLetter.objects.all(), "task_name")
    assert names == sorted(set(DeadLetter.objects.values_list("task_name", flat=True)))
    paginator = EstimatedCountPaginator(DeadLetter.objects.all(), 10)
    assert paginator.count == 60 and not paginator.capped
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("celery_guard.dlq.scale.COUNT_CAP", 20)
        capped = EstimatedCountPaginator(DeadLetter.objects.filter(attempts=5), 10)
        assert capped.count == 20 and capped.capped


@pytest.mark.django_db
def test_estimated_count_on_postgresql(postgres):
    seeding.seed(200, batch=100)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("celery_guard.dlq.scale.ESTIMATE_FROM", 100)
        paginator = EstimatedCountPaginator(DeadLetter.objects.all(), 10)
        # ANALYZE ran after the seed, inside this test's transaction: the estimate is exact.
        assert paginator.count == 200 and paginator.estimated
        # No page deeper than MAX_PAGES: its OFFSET would walk the whole index.
        patch.setattr("celery_guard.dlq.scale.MAX_PAGES", 5)
        paginator = EstimatedCountPaginator(DeadLetter.objects.all(), 10)
        assert paginator.num_pages == 5
        with pytest.raises(InvalidPage):
            paginator.page(6)


def test_parse_when():
    now = timezone.now()
    assert services.parse_when("2h", now=now) == now - dt.timedelta(hours=2)
    assert services.parse_when("2026-01-02").isoformat() == "2026-01-02T00:00:00+00:00"
    with pytest.raises(ValueError):
        services.parse_when("yesterday")


def test_settings_are_checked(settings):

    settings.CELERY_GUARD_REDACT_FIELDS = "password"
    settings.CELERY_GUARD_DLQ_RETENTION_DAYS = 0
    settings.CELERY_GUARD_SENTRY_EVENT_URL = "https://sentry.example/no-placeholder"
    errors = " ".join(e.msg for e in check_setting_values())
    assert "REDACT_FIELDS" in errors
    assert "DLQ_RETENTION_DAYS" in errors
    assert "SENTRY_EVENT_URL" in errors


@pytest.mark.django_db
def test_replay_rearms_the_key_the_dead_task_still_holds():
    from celery_guard.idempotency import ledger

    store = ledger.get_ledger()
    held = dead_letter("held", idempotency_key="dlq-test:held")
    other = dead_letter("other", idempotency_key="dlq-test:other")
    common = {"task_name": UNTIL_FIXED, "fingerprint": "f", "window": 60, "owner": "w", "lease": 60}
    store.start("dlq-test:held", task_id=held.task_id, **common)  # died holding its lease
    store.start("dlq-test:other", task_id="a-newer-task", **common)  # taken since by another
    assert replay.replay_one(held, app=app) == replay.REPLAYED
    assert replay.replay_one(other, app=app) == replay.REPLAYED
    assert store.get("dlq-test:held")["state"] == "released"
    assert store.get("dlq-test:other")["state"] == "running"


@pytest.mark.django_db
def test_probed_date_hierarchy_matches_the_grouping_query():
    seeding.seed(80)
    plain = DeadLetter.objects.filter(status="dead")
    probed = plain.all()
    probed.__class__ = ProbedDatesQuerySet
    for kind in ("year", "month", "day"):
        expected = list(plain.datetimes("failed_at", kind))
        assert probed.datetimes("failed_at", kind) == expected
        assert probed.datetimes("failed_at", kind, "DESC") == expected[::-1]
    assert probed.filter(status="nope").datetimes("failed_at", "month") == []


@pytest.mark.django_db
def test_an_unroutable_row_replays_once_its_arguments_bind_again(redis_url, queues):
    row = dead_letter("later", kwargs={"note": "n"}, status="unroutable")
    assert replay.replay_one(row, app=app) == replay.REPLAYED
    row.refresh_from_db()
    assert row.status == "replayed" and queue_length(redis_url, queues["default"]) == 1


@pytest.mark.django_db
def test_replay_logs_mask_sensitive_arguments(monkeypatch):
    lines = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())
    probe = logging.getLogger(f"cg-test-replay-{id(lines)}")
    probe.setLevel(logging.INFO)
    probe.addHandler(handler)
    monkeypatch.setattr(replay, "logger", probe)
    row = dead_letter("logged", kwargs={"note": {"Token": "t0k", "n": 1}})
    assert replay.replay_one(row, app=app) == replay.REPLAYED
    [line] = [line for line in lines if "replayed dead letter" in line]
    assert "t0k" not in line and f"'Token': '{redaction.MASK}'" in line


def guarded(guard):
    """A stand-in for the task a ``task_prerun``/``task_postrun`` signal names."""
    return SimpleNamespace(request=SimpleNamespace(headers={"celery_guard": guard}))


@pytest.mark.django_db
def test_the_replay_receivers_cost_an_ordinary_task_no_query(django_assert_num_queries):
    ordinary = [
        SimpleNamespace(),
        SimpleNamespace(request=SimpleNamespace(headers=None)),
        guarded({"v": 1, "attempt": 2, "priority": "default"}),
        guarded({"v": 1, "replay_of": "junk"}),
    ]
    with django_assert_num_queries(0):
        for task in ordinary:
            receivers.replay_run_started(task_id="t", task=task)
            receivers.replay_run_finished(task_id="t", task=task, state=states.SUCCESS)
    row = dead_letter("replayed")
    DeadLetterReplay.objects.create(dead_letter=row, task_id="r-1")
    with django_assert_num_queries(1):  # a replay: one UPDATE by task id
        receivers.replay_run_finished(
            task_id="r-1", task=guarded({"replay_of": row.pk}), state=states.SUCCESS
        )


@pytest.mark.django_db
def test_the_replay_record_follows_its_run():
    row = dead_letter("run")
    record = DeadLetterReplay.objects.create(dead_letter=row, task_id="r-1")
    task = guarded({"v": 1, "attempt": 1, "replay_of": row.pk})

    def signal(receiver, **kw):
        receiver(task_id="r-1", task=task, **kw)
        record.refresh_from_db()
        return record.outcome

    assert record.outcome == "published"
    assert signal(receivers.replay_run_started) == "started"
    assert signal(receivers.replay_run_finished, state=states.RETRY) == "retrying"
    assert record.finished_at is None and record.updated_at is not None
    assert signal(receivers.replay_run_started) == "started"
    assert signal(receivers.replay_run_finished, state=states.IGNORED) == "started"
    assert signal(receivers.replay_run_finished, state=states.SUCCESS) == "succeeded"
    assert record.finished_at is not None
    # A redelivery of a finished replay does not make it look running again.
    assert signal(receivers.replay_run_started) == "succeeded"
    assert receivers.replay_outcome(states.FAILURE) == "failed"
    assert receivers.replay_outcome(states.REVOKED) == "failed"
    # The guard requeues the message when it cannot write the dead letter: it runs again.
    assert receivers.replay_outcome(states.REJECTED, Reject("x", requeue=True)) == "retrying"
    assert receivers.replay_outcome(states.REJECTED, Reject("x", requeue=False)) == "failed"
    assert receivers.replay_outcome(None) is None
    # The worker skipped it: its key had already succeeded.
    assert receivers.replay_outcome(states.SUCCESS, skipped=True) == "skipped"


@pytest.mark.django_db
def test_replay_bookkeeping_errors_are_logged_never_raised(monkeypatch, caplog):
    task = guarded({"replay_of": 999999})
    with caplog.at_level(logging.INFO, logger="celery_guard"):
        receivers.replay_run_finished(task_id="gone", task=task, state=states.SUCCESS)
        assert "has no replay record" in caplog.text

        def broken(*args, **kwargs):
            raise DatabaseError("database down")

        monkeypatch.setattr(receivers, "record_replay_outcome", broken)
        receivers.replay_run_started(task_id="gone", task=task)
        receivers.replay_run_finished(task_id="gone", task=task, state=states.FAILURE)
    assert "could not record the start of replay gone" in caplog.text
    assert "could not record the outcome of replay gone" in caplog.text
