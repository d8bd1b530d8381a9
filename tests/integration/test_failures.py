"""Failure pipeline pieces on the database: delivery markers, dead-letter writes, capture."""

import datetime as dt
import logging
import os

import pytest
from django.test import override_settings

from celery_guard.dlq import records, replay
from celery_guard.failures import deliveries
from celery_guard.models import DeadLetter, Delivery
from celery_guard.signals import dead_lettered
from tests.testapp import fail_tasks


@pytest.mark.django_db
def test_delivery_markers_count_lost_deliveries():
    first = deliveries.begin("t1", "task", 0, "host")
    assert (first.lost, first.timed_out) == (0, False)
    # The same message again while its marker is still there: the worker was lost.
    second = deliveries.begin("t1", "task", 0, "host")
    assert second.lost == 1
    deliveries.end("t1", first.token)  # a stale token deletes nothing
    assert Delivery.objects.filter(task_id="t1").exists()
    # A retry (higher retry count) racing the previous marker's deletion is not a loss.
    retried = deliveries.begin("t1", "task", 1, "host")
    assert retried.lost == 0
    deliveries.mark_timed_out("t1")
    deliveries.end("t1", retried.token)  # kept for the redelivery to see
    after_kill = deliveries.begin("t1", "task", 1, "host")
    assert (after_kill.lost, after_kill.timed_out) == (0, True)
    deliveries.end("t1", after_kill.token)
    assert not Delivery.objects.exists()


@pytest.mark.django_db
def test_delivery_marker_of_a_first_delivery_is_one_statement_each_way(
    django_assert_num_queries,
):
    # Every guarded run pays these on its critical path: one insert before, one delete after.
    with django_assert_num_queries(1):
        started = deliveries.begin("t-first", "task", 0, "host")
    row = Delivery.objects.get(task_id="t-first")
    assert (row.task_name, row.retries, row.token, row.lost, row.timed_out) == (
        "task",
        0,
        started.token,
        0,
        False,
    )
    assert (row.hostname, row.pid) == ("host", os.getpid())
    with django_assert_num_queries(1):
        deliveries.end("t-first", started.token)
    assert not Delivery.objects.filter(task_id="t-first").exists()


def failure(**overrides):
    values = {
        "task_name": "tests.x",
        "task_id": "id-1",
        "reason": "permanent",
        "exception_class": "builtins.ValueError",
        "message": "m" * 5000,
        "args": [1, {"a": 2}],
        "kwargs": {"k": "v"},
        "headers": {
            "celery_guard": {
                "v": 1,
                "first_enqueued_at": 1_700_000_000.0,
                "attempt": 3,
                "idempotency": {"key": "notify:7", "fingerprint": "f"},
            }
        },
        "queue": "q",
    }
    return records.Failure(**{**values, **overrides})


@pytest.mark.django_db
def test_dead_letter_write_sends_the_signal_and_survives_receiver_errors(caplog):
    received = []

    def receiver(sender, **kwargs):
        received.append(kwargs)

    def broken(sender, **kwargs):
        raise RuntimeError("receiver bug")

    dead_lettered.connect(receiver, weak=False)
    dead_lettered.connect(broken, weak=False)
    try:
        with caplog.at_level(logging.ERROR, logger="celery_guard"):
            row = records.write(failure())
    finally:
        dead_lettered.disconnect(receiver)
        dead_lettered.disconnect(broken)
    assert len(row.message) < 2100 and row.message.endswith("characters cut]")
    assert row.first_enqueued_at == dt.datetime.fromtimestamp(1_700_000_000, dt.timezone.utc)
    [kwargs] = received
    assert kwargs == {
        "signal": dead_lettered,
        "dead_letter": row,
        "task_name": "tests.x",
        "task_id": "id-1",
        "idempotency_key": "notify:7",
        "reason": "permanent",
    }
    assert "dead-lettered tests.x[id-1]" in caplog.text
    assert "receiver bug" in caplog.text


@pytest.mark.django_db
def test_replay_options_start_a_fresh_guard_header():
    guard = {
        "v": 1,
        "first_enqueued_at": 1.0,
        "attempt": 4,
        "priority": "low",
        "idempotency": {"key": "k"},
        "consumed": 3,
        "history": [{}],
        "delay": 1,
        "throttled": 0,
    }
    row = DeadLetter.objects.create(
        task_name="t",
        task_id="i",
        queue="q",
        args=[1],
        kwargs={"a": 1},
        headers={"celery_guard": guard, "x-other": 1},
        options={"priority": 5, "time_limit": 30},
        reason="exhausted",
    )
    options = replay.replay_options(row)
    header = options["headers"]["celery_guard"]
    assert header["attempt"] == 1 and header["first_enqueued_at"] > 1.0
    assert {k: header[k] for k in ("priority", "idempotency")} == {
        "priority": "low",
        "idempotency": {"key": "k"},
    }
    assert not set(header) & {"consumed", "history", "delay", "throttled"}
    assert options["headers"]["x-other"] == 1
    assert (options["args"], options["kwargs"], options["queue"]) == ([1], {"a": 1}, "q")
    assert (options["priority"], options["time_limit"]) == (5, 30)


@pytest.mark.django_db
def test_capture_unguarded_failures_only_when_enabled():
    fail_tasks.fail_unguarded.apply(("off",))
    assert not DeadLetter.objects.exists()
    with override_settings(CELERY_GUARD_CAPTURE_UNGUARDED=True):
        fail_tasks.fail_unguarded.apply(("on",))
        # A guarded task is recorded by its own pipeline on a worker, never by the receiver.
        fail_tasks.fail_permanent.apply(("guarded",))
    row = DeadLetter.objects.get()
    assert (row.task_name, row.reason, row.guarded) == (
        fail_tasks.fail_unguarded.name,
        "failed",
        False,
    )
    assert row.args == ["on"]
    assert row.exception_class == "builtins.RuntimeError"


def published_headers(redis_url, queue):
    import json

    import redis

    [raw] = redis.Redis.from_url(redis_url).lrange(queue, 0, -1)
    return json.loads(raw)["headers"]


def test_project_default_time_limits_apply_to_tasks_without_their_own(
    redis_url, queues, empty_queues
):
    with override_settings(CELERY_GUARD_SOFT_TIME_LIMIT=30, CELERY_GUARD_TIME_LIMIT=40):
        fail_tasks.fail_permanent.delay("limits")
        assert published_headers(redis_url, queues["default"])["timelimit"] == [40, 30]
    from tests.support.harness import purge

    purge(redis_url, [queues["default"]])
    with override_settings(CELERY_GUARD_SOFT_TIME_LIMIT=30, CELERY_GUARD_TIME_LIMIT=40):
        fail_tasks.fail_soft_limit.delay("own")  # soft_time_limit=0.3 on the task
    # The task's own soft limit wins; the hard one it lacks comes from the setting.
    assert published_headers(redis_url, queues["default"])["timelimit"] == [40, 0.3]
