"""Faults inside the guard's own machinery end in a record, never in a loop (issue 13).

Each test runs real workers; each message must end, after a bounded number of deliveries,
in a dead letter with a clear reason (or run as it should), and the queue must be empty.
"""

import math
import re
import time
import uuid

import pytest
from django.conf import settings

from celery_guard.dlq.models import DeadLetter, Reason
from tests.support.harness import queue_length, wait_until
from tests.testapp import fail_tasks
from tests.testapp.models import Execution
from tests.testapp.tasks import default_job

pytestmark = pytest.mark.django_db(transaction=True)

BROKERS = ["redis", "amqp"]


@pytest.fixture(params=BROKERS)
def broker(request):
    """The broker URL of the test, Redis or RabbitMQ."""
    return request.getfixturevalue(f"{request.param}_url")


def send(broker_url, task, args=(), kwargs=None, **options):
    """Publish through the guard on ``broker_url``."""
    from kombu import Connection

    from tests.celery_app import app

    with Connection(broker_url) as conn:
        return task.apply_async(args, kwargs, producer=app.amqp.Producer(conn), **options)


def send_raw(broker_url, name, args, queue, **options):
    """Publish like any other Celery client would: no guard checks, headers as given."""
    from kombu import Connection

    from tests.celery_app import app

    with Connection(broker_url) as conn:
        return app.send_task(name, args, queue=queue, producer=app.amqp.Producer(conn), **options)


def dead_letter_of(task_id, timeout=30):
    return wait_until(lambda: DeadLetter.objects.filter(task_id=task_id[:255]).first(), timeout)


def runs(label):
    return Execution.objects.filter(label=label).count()


def settled(broker_url, queue, label, count, seconds=1.0):
    """No further run and nothing left queued: the message ended."""
    time.sleep(seconds)
    assert runs(label) == count
    assert queue_length(broker_url, queue) == 0


def test_nul_characters_end_in_a_sanitized_dead_letter(start_worker, broker, queues):
    start_worker(["default"], broker_url=broker)
    result = send(broker, fail_tasks.fail_nul, ("nul",), {"text": "a\x00b"})
    row = dead_letter_of(result.id)
    settled(broker, queues["default"], "nul", 1)
    assert row.reason == Reason.PERMANENT
    assert row.kwargs == {"text": "a\\u0000b"}
    assert row.message == "bad input a\\u0000b"
    assert "stored sanitized (kwargs, history)" in row.status_reason
    assert DeadLetter.objects.count() == 1


FORGED = {
    "tenant": {"tenant": "t" * 300},
    "replay_of": {"replay_of": 0},
    "first_far": {"first_enqueued_at": 1e20},
    "consumed_negative": {"consumed": -10},
    "consumed_huge": {"consumed": 2**40},
    "window_negative": {"idempotency": {"key": "k", "fingerprint": "f", "window": -1}},
    "nul": {"tenant": "t\x00"},
}
#: Values RabbitMQ cannot even carry in a header: integers over 64 bits, NaN, infinities.
FORGED_REDIS = {
    "replay_of_huge": {"replay_of": 2**70},
    "first_nan": {"first_enqueued_at": math.nan},
    "consumed_infinite": {"consumed": math.inf},
    "window_infinite": {"idempotency": {"key": "k", "fingerprint": "f", "window": math.inf}},
}


def test_forged_header_values_are_dead_lettered_unrun(start_worker, broker, queues):
    start_worker(["default"], broker_url=broker)
    queue = queues["default"]
    sent = {}
    forged = {**FORGED, **(FORGED_REDIS if broker.startswith("redis") else {})}
    for label, fields in forged.items():
        guard = {"v": 1, "first_enqueued_at": time.time(), "attempt": 1, **fields}
        result = send_raw(
            broker, default_job.name, (label,), queue, headers={"celery_guard": guard}
        )
        sent[label] = result.id
    if broker.startswith("redis"):  # AMQP carries at most 255 characters there
        long_id = "x" * 300
        send_raw(broker, default_job.name, ("long_id",), queue, task_id=long_id)
        sent["long_id"] = long_id
    for label, task_id in sent.items():
        row = dead_letter_of(task_id)
        assert row.reason == Reason.INVALID_HEADER, label
        assert row.exception_class == "celery_guard.exceptions.InvalidHeaderError"
        assert row.args == [label]
    time.sleep(1)
    assert not Execution.objects.exists()  # no body ran
    assert DeadLetter.objects.count() == len(sent)
    assert queue_length(broker, queue) == 0


def test_a_retry_whose_priority_level_was_removed_is_dead_lettered(
    start_worker, broker, queues, settings
):
    # Published for a level the workers' configuration no longer has.
    spare = f"{queues['low']}-spare"
    settings.CELERY_GUARD_PRIORITY_QUEUES = {**queues, "spare": spare}
    start_worker([spare], broker_url=broker)
    result = send(broker, fail_tasks.fail_down, ("unroutable",), guard={"priority": "spare"})
    row = dead_letter_of(result.id)
    settled(broker, spare, "unroutable", 1)
    assert row.reason == Reason.REPUBLISH_FAILED
    assert row.exception_class == "celery_guard.exceptions.RepublishError"
    assert "priority level 'spare' is not in CELERY_GUARD_PRIORITY_QUEUES" in row.message
    assert [h["error"] for h in row.history] == ["builtins.ConnectionError"]


def refuse_dead_letters(when):
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            f"""
            CREATE FUNCTION cg_refuse_dead_letter() RETURNS trigger AS $$
            BEGIN RAISE EXCEPTION 'dead-letter table unavailable'; END $$ LANGUAGE plpgsql;
            CREATE TRIGGER cg_refuse BEFORE INSERT ON celery_guard_deadletter
            FOR EACH ROW WHEN ({when}) EXECUTE FUNCTION cg_refuse_dead_letter();
            """
        )


def accept_dead_letters():
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "DROP TRIGGER IF EXISTS cg_refuse ON celery_guard_deadletter;"
            "DROP FUNCTION IF EXISTS cg_refuse_dead_letter();"
        )


def test_a_row_the_database_refuses_becomes_a_minimal_record(start_worker, postgres, queues):
    worker = start_worker(["default"])
    refuse_dead_letters("NEW.args ->> 0 = 'refused'")
    try:
        result = fail_tasks.fail_permanent.delay("refused")
        row = dead_letter_of(result.id)
        settled(settings.CELERY_BROKER_URL, queues["default"], "refused", 1)
    finally:
        accept_dead_letters()
    assert row.reason == Reason.PERMANENT
    assert row.args == []
    assert "'refused'" in row.traceback and "ValueError: bad input refused" in row.traceback
    assert row.status_reason.startswith("minimal record")
    assert "dead-letter table unavailable" in row.status_reason
    assert "could NOT write the dead letter" in worker.log_path.read_text()


def test_an_unwritable_dead_letter_keeps_the_message_with_a_count(start_worker, postgres):
    start_worker(["default"])
    refuse_dead_letters("true")
    try:
        result = fail_tasks.fail_permanent.delay("dlq-down")
        # Republished (not dropped, not requeued hot) while nothing can be written.
        wait_until(lambda: runs("dlq-down") >= 2, 30)
        assert not DeadLetter.objects.exists()
    finally:
        accept_dead_letters()
    row = dead_letter_of(result.id)
    assert row.reason == Reason.PERMANENT
    if row.status_reason.startswith("minimal record"):
        # The table came back between a delivery's refused full row and its minimal
        # fallback: the minimal row keeps the raw message (headers included) as text.
        assert re.search(r"'write_failures': [1-9]", row.traceback), row.traceback[:2000]
    else:
        assert row.headers["celery_guard"]["write_failures"] >= 1
    assert DeadLetter.objects.count() == 1


def test_a_dead_database_connection_is_replaced_not_looped_on(start_worker, postgres):
    from django.db import connection

    app_name = f"cg-i13-{uuid.uuid4().hex[:8]}"
    worker = start_worker(["default"], extra_env={"CG_DB_APPLICATION_NAME": app_name})
    default_job.delay("warm")
    wait_until(lambda: runs("warm") == 1, 30)
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            [app_name],
        )
        assert cursor.fetchall()  # the worker's connection was there, and is gone
    default_job.delay("after")
    wait_until(lambda: runs("after") == 1, 30)
    settled(
        settings.CELERY_BROKER_URL, settings.CELERY_GUARD_PRIORITY_QUEUES["default"], "after", 1
    )
    assert not DeadLetter.objects.exists()
    assert worker.log_path.read_text().count("could not write the delivery marker") <= 1


def test_a_delivery_starting_past_its_deadline_does_not_run(start_worker, queues):
    start_worker(["default"])
    result = fail_tasks.fail_deadline.apply_async(("late",), countdown=2.5)  # deadline 1.5 s
    row = dead_letter_of(result.id)
    settled(settings.CELERY_BROKER_URL, queues["default"], "late", 0)
    assert row.reason == Reason.DEADLINE
    assert row.attempts == 0
    assert "past its deadline" in row.message


def test_a_key_failed_by_a_message_without_the_guard_header_is_released(start_worker, queues):
    from celery import current_app

    from celery_guard.models import IdempotencyRecord
    from tests.testapp.idem_tasks import idem_give_up

    start_worker(["high"])
    # A duplicate sent past the guard: the worker derives the key from the arguments.
    first = current_app.send_task(idem_give_up.name, ("k9",), queue=queues["high"])
    row = dead_letter_of(first.id)
    key = f"{idem_give_up.name}:give_up:k9"
    assert row.idempotency_key == key
    wait_until(lambda: IdempotencyRecord.objects.get(key=key).state == "released", 10)
    # The fixed resubmission is published, not answered with the dead task's id.
    again = idem_give_up.delay("k9")
    assert again.id != first.id


def test_a_keyed_poison_message_takes_its_key_over_and_is_capped(start_worker, broker, queues):
    from tests.testapp.idem_tasks import idem_kill_self

    # The default 600 s lease: a redelivery that waited it out would never reach the cap.
    worker = start_worker(["high"], broker_url=broker)
    result = send(broker, idem_kill_self, ("p5",))
    row = dead_letter_of(result.id, timeout=120)  # three kills and restarts of the pool process
    time.sleep(1)
    # CELERY_GUARD_MAX_WORKER_LOST = 3: each redelivery took its own key over at once.
    labels = sorted(Execution.objects.values_list("label", flat=True))
    assert labels == ["p5:1", "p5:2", "p5:3"]
    assert row.reason == Reason.WORKER_LOST
    assert queue_length(broker, queues["high"]) == 0
    assert worker.process.poll() is None


def test_a_key_that_succeeded_is_never_dead_lettered(start_worker, queues):
    from celery_guard.models import IdempotencyRecord
    from tests.testapp.idem_tasks import idem_commit_then_die

    # One lost delivery is the cap: the redelivery would be a poison message.
    worker = start_worker(["high"], extra_env={"CG_MAX_WORKER_LOST": "1"})
    idem_commit_then_die.delay("p7")
    key = f"{idem_commit_then_die.name}:done:p7"
    wait_until(lambda: "skipped: its key already succeeded" in worker.log_path.read_text(), 60)
    settled(settings.CELERY_BROKER_URL, queues["high"], "p7:1", 1)
    assert not DeadLetter.objects.exists()
    assert IdempotencyRecord.objects.get(key=key).state == "succeeded"
    # A duplicate publish of the key is a skip too: the body never runs again.
    from celery import current_app

    current_app.send_task(idem_commit_then_die.name, ("p7",), queue=queues["high"])
    wait_until(lambda: worker.log_path.read_text().count("skipped: key") >= 1, 30)
    settled(settings.CELERY_BROKER_URL, queues["high"], "p7:1", 1)
    assert not DeadLetter.objects.exists()


def test_a_dead_letter_never_releases_a_key_that_succeeded_and_its_replay_is_skipped(
    start_worker, queues
):
    from celery import current_app

    from celery_guard import signals
    from celery_guard.dlq import replay
    from celery_guard.dlq.models import DeadLetterReplay, ReplayOutcome
    from celery_guard.models import IdempotencyRecord
    from tests.testapp.idem_tasks import idem_atomic

    start_worker(["high"])
    result = idem_atomic.delay("r7")
    key = f"{idem_atomic.name}:atomic:r7"
    wait_until(lambda: IdempotencyRecord.objects.filter(key=key, state="succeeded").exists(), 30)
    [run] = Execution.objects.filter(label="r7")
    # A dead letter of that same task id (a copy Redis restored past the visibility timeout
    # and counted as a lost worker, by a version without the ledger check): its signal must
    # not free the key, and its replay must not run the committed effect again.
    signals.dead_lettered.send(
        sender=None,
        task_name=idem_atomic.name,
        task_id=result.id,
        idempotency_key=key,
        reason=Reason.WORKER_LOST,
    )
    assert IdempotencyRecord.objects.get(key=key).state == "succeeded"
    row = DeadLetter.objects.create(
        task_name=idem_atomic.name,
        task_id=result.id,
        queue=queues["high"],
        args=["r7"],
        headers={"celery_guard": run.guard_header},
        idempotency_key=key,
        reason=Reason.WORKER_LOST,
    )
    assert replay.replay_one(row, app=current_app) == replay.REPLAYED
    record = wait_until(
        lambda: DeadLetterReplay.objects.filter(
            dead_letter=row, outcome=ReplayOutcome.SKIPPED
        ).first(),
        30,
    )
    assert record.get_outcome_display() == "skipped (already succeeded)"
    settled(settings.CELERY_BROKER_URL, queues["high"], "r7", 1)
    assert IdempotencyRecord.objects.get(key=key).state == "succeeded"


def unacked_ids(broker_url):
    """Task ids of the messages Redis holds delivered but not acknowledged."""
    import json

    import redis

    client = redis.Redis.from_url(broker_url)
    found = set()
    for raw in client.hvals(settings.CELERY_BROKER_TRANSPORT_OPTIONS["unacked_key"]):
        message, _exchange, _routing_key = json.loads(raw)
        found.add(message["headers"].get("id"))
    return found


def test_no_guarded_message_is_acked_without_a_run_a_skip_or_a_record(
    start_worker, postgres, queues, settings
):
    """Every terminal path this test can trigger ends in one of the three, per message id.

    The record is a dead letter; when not even a minimal one can be written for
    ``CELERY_GUARD_DEAD_LETTER_WRITE_TRIES`` deliveries, it is the CRITICAL log line that
    carries the whole message (the bounded give-up, shortened here to two tries).
    """
    from celery import current_app

    from tests.testapp.idem_tasks import idem_atomic

    spare = f"{queues['low']}-spare"
    settings.CELERY_GUARD_PRIORITY_QUEUES = {**queues, "spare": spare}
    worker = start_worker(
        ["default", "high", spare],
        extra_env={"CG_DEAD_LETTER_WRITE_TRIES": "2", "CG_MAX_WORKER_LOST": "1"},
    )
    broker = settings.CELERY_BROKER_URL
    lost_record = str(uuid.uuid4())
    refuse_dead_letters(f"NEW.task_id = '{lost_record}'")
    expected = {}  # message id -> "run" | "skip" | "record" | "given up"
    try:
        expected[default_job.delay("ok").id] = "run"
        first = idem_atomic.delay("once")
        expected[first.id] = "run"
        wait_until(lambda: runs("once") == 1, 30)
        duplicate = current_app.send_task(idem_atomic.name, ("once",), queue=queues["high"])
        expected[duplicate.id] = "skip"
        expected[fail_tasks.fail_permanent.delay("perm").id] = "record"
        expected[fail_tasks.fail_always.delay("exhausted").id] = "record"
        late = fail_tasks.fail_deadline.apply_async(("late",), countdown=2.5)
        expected[late.id] = "record"
        forged = {"v": 2, "first_enqueued_at": time.time(), "attempt": 1, "consumed": -1}
        invalid = send_raw(
            broker,
            default_job.name,
            ("forged",),
            queues["default"],
            headers={"celery_guard": forged},
        )
        expected[invalid.id] = "record"
        unroutable = send(
            broker, fail_tasks.fail_down, ("unroutable",), guard={"priority": "spare"}
        )
        expected[unroutable.id] = "record"
        expected[fail_tasks.fail_kill_self.delay("poison").id] = "record"
        gave_up = fail_tasks.fail_permanent.apply_async(("lost-record",), task_id=lost_record)
        expected[gave_up.id] = "given up"
        # Nothing left queued or delivered-but-unacknowledged: every message was acked.
        queue_names = [queues["default"], queues["high"], spare]
        wait_until(
            lambda: (
                all(queue_length(broker, q) == 0 for q in queue_names)
                and not (unacked_ids(broker) & set(expected))
                and "GAVE UP" in worker.log_path.read_text()
            ),
            120,
        )
        time.sleep(1)
    finally:
        accept_dead_letters()
    log = worker.log_path.read_text()
    outcomes = {}
    for task_id in expected:
        found = []
        if DeadLetter.objects.filter(task_id=task_id).exists():
            found.append("record")
        if re.search(rf"GAVE UP recording the dead letter of \S+\[{task_id}\] after", log):
            found.append("given up")
        if f"[{task_id}] skipped" in log:
            found.append("skip")
        elif re.search(rf"\[{task_id}\] succeeded in", log):
            found.append("run")
        outcomes[task_id] = found
    assert outcomes == {task_id: [outcome] for task_id, outcome in expected.items()}
    assert runs("once") == 1 and runs("ok") == 1 and runs("forged") == 0
    reasons = set(DeadLetter.objects.values_list("reason", flat=True))
    assert reasons == {
        Reason.PERMANENT,
        Reason.EXHAUSTED,
        Reason.DEADLINE,
        Reason.INVALID_HEADER,
        Reason.REPUBLISH_FAILED,
        Reason.WORKER_LOST,
    }
