"""Idempotency on real services: racing producers, a SIGKILLed worker, retries, conflicts."""

import base64
import collections
import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest
import redis
from django.conf import settings

from celery_guard import IdempotencyConflict
from celery_guard.models import IdempotencyRecord
from tests.support.harness import ROOT, queue_length, wait_until
from tests.support.idem import redis_keys
from tests.testapp.idem_tasks import idem_crash, idem_notify, idem_race, idem_retry
from tests.testapp.models import Execution

pytestmark = pytest.mark.django_db(transaction=True)

PROCESSES, ENQUEUES, KEYS = 8, 500, 1000


def queued_messages(redis_url, queue):
    client = redis.Redis.from_url(redis_url)
    return [json.loads(raw) for raw in client.lrange(queue, 0, -1)]


def test_racing_producers_publish_each_key_once(
    idem_backend, idem_store, redis_url, queues, empty_queues, test_db_name, tmp_path
):
    go = tmp_path / "go"
    env = {
        **os.environ,
        "CG_WORKER_DB_NAME": test_db_name,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "example_project")]),
        "CELERY_GUARD_LOG_LEVEL": "WARNING",
    }
    procs = []
    for i in range(PROCESSES):
        log = (tmp_path / f"p{i}.log").open("wb")
        cmd = [
            sys.executable,
            "-m",
            "tests.support.idem_race",
            str(i),
            str(KEYS),
            str(ENQUEUES),
            str(go),
            str(tmp_path / f"p{i}.json"),
        ]
        procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=log))
    time.sleep(3)  # let every producer finish django.setup() and wait on the go file
    go.touch()
    for i, proc in enumerate(procs):
        assert proc.wait(120) == 0, (tmp_path / f"p{i}.log").read_text()[-3000:]

    results = [json.loads((tmp_path / f"p{i}.json").read_text()) for i in range(PROCESSES)]
    assert sum(map(len, results)) == PROCESSES * ENQUEUES
    ids_by_key = collections.defaultdict(set)
    for result in results:
        for n, task_id in result:
            ids_by_key[n].add(task_id)
    # Every producer got the same task id for a key: the one that was published.
    assert len(ids_by_key) == KEYS
    assert all(len(ids) == 1 for ids in ids_by_key.values())

    # On the broker: exactly one message per key, and it is that task.
    messages = queued_messages(redis_url, queues["low"])
    assert queue_length(redis_url, queues["low"]) == KEYS == len(messages)
    published = collections.Counter(json.loads(base64.b64decode(m["body"]))[0][0] for m in messages)
    assert set(published) == set(range(KEYS))
    assert set(published.values()) == {1}
    assert {m["headers"]["id"] for m in messages} == {i for ids in ids_by_key.values() for i in ids}

    # In the ledger: one pending record per key, held by the published task.
    if idem_backend == "database":
        records = list(IdempotencyRecord.objects.values_list("key", "task_id", "state"))
    else:
        records = [
            (
                k.decode(),
                *(v.decode() for v in redis.Redis.from_url(redis_url).hmget(k, "task_id", "state")),
            )
            for k in redis_keys(settings.CELERY_GUARD_IDEMPOTENCY_REDIS_PREFIX)
        ]
    assert len(records) == KEYS
    assert {r[2] for r in records} == {"pending"}
    for n in (0, 499, 999):
        assert idem_store.get(f"{idem_race.name}:race:{n}")["task_id"] in ids_by_key[n]


def crash_and_restart(start_worker, when, tmp_path, lease="600"):
    """Run ``idem_crash`` on a worker that SIGKILLs itself, then restart a worker.

    Returns the task id and the log of the second worker, once it has handled the
    redelivered message.
    """
    env = {"CG_VISIBILITY_TIMEOUT": "1", "CG_IDEMPOTENCY_LEASE": lease}
    marker = tmp_path / "killed"
    first = start_worker(["high"], extra_env=env)
    result = idem_crash.delay(when, marker=str(marker), when=when)
    wait_until(lambda: first.process.poll() is not None, timeout=60)
    assert first.process.returncode == -signal.SIGKILL
    assert marker.exists()
    assert Execution.objects.filter(label__startswith=f"{when}:").count() == 1
    # The message was not acked: after the visibility timeout Redis gives it to the new worker.
    time.sleep(1.5)
    second = start_worker(["high"], extra_env=env)
    done = f"{idem_crash.name}[{result.id}] " + ("runs key" if lease != "600" else "skipped")
    wait_until(lambda: done in second.log_path.read_text(errors="replace"), 60)
    return result.id


def labels(prefix):
    return sorted(
        Execution.objects.filter(label__startswith=prefix).values_list("label", flat=True)
    )


def test_sigkill_after_the_body_returned_does_not_run_it_again(
    idem_backend, start_worker, redis_url, queues, tmp_path
):
    crash_and_restart(start_worker, "after_return", tmp_path)
    assert labels("after_return:") == ["after_return:1"]
    wait_until(lambda: queue_length(redis_url, queues["high"]) == 0, 10)


def test_sigkill_after_a_transactional_completion_does_not_run_it_again(start_worker, tmp_path):
    crash_and_restart(start_worker, "atomic", tmp_path)
    assert labels("atomic:") == ["atomic:1"]
    assert IdempotencyRecord.objects.get().state == "succeeded"


def test_sigkill_before_completion_is_taken_over_with_a_higher_fencing_token(
    idem_backend, idem_store, start_worker, tmp_path
):
    task_id = crash_and_restart(start_worker, "before_completion", tmp_path, lease="1")
    key = f"{idem_crash.name}:crash:before_completion"
    wait_until(lambda: idem_store.get(key)["state"] == "succeeded", 30)
    # At-least-once: the dead owner's effect happened, the new owner ran again with token 2,
    # so a downstream that checks tokens can reject anything the stale attempt still sends.
    assert labels("before_completion:") == ["before_completion:1", "before_completion:2"]
    record = idem_store.get(key)
    assert (record["task_id"], record["fencing_token"]) == (task_id, 2)


def test_a_celery_retry_of_the_same_task_runs_again_under_a_new_token(
    idem_backend, idem_store, start_worker
):
    start_worker(["high"])
    result = idem_retry.delay("r")
    key = f"{idem_retry.name}:retry:r"
    wait_until(lambda: (idem_store.get(key) or {}).get("state") == "succeeded", 60)
    labels = sorted(Execution.objects.values_list("label", flat=True))
    assert labels == ["r:0:1", "r:1:2"]  # attempt 2 ran, with a higher fencing token
    record = idem_store.get(key)
    assert (record["task_id"], record["fencing_token"]) == (result.id, 2)


def test_enqueue_dedup_and_worker_skip_end_to_end(
    idem_backend, idem_store, start_worker, redis_url, queues
):
    first = idem_notify.delay(10, "v1")
    assert idem_notify.delay(10, "v1").id == first.id
    with pytest.raises(IdempotencyConflict):
        idem_notify.delay(10, "v1", note="other")
    assert queue_length(redis_url, queues["high"]) == 1
    worker = start_worker(["high"])
    key = f"{idem_notify.name}:notify:10:v1"
    wait_until(lambda: (idem_store.get(key) or {}).get("state") == "succeeded", 60)
    # A duplicate that slips past the enqueue check (published directly) does not run again.
    idem_notify.apply_async((10, "v1"), guard={"idempotency_key": "other-key"})
    from celery import current_app

    current_app.send_task(idem_notify.name, (10, "v1"), queue=queues["high"])
    wait_until(lambda: "skipped: key" in worker.log_path.read_text(errors="replace"), 60)
    wait_until(lambda: Execution.objects.count() >= 2, 60)
    labels = sorted(Execution.objects.values_list("label", flat=True))
    # The first run and the run under the other key; the direct publish was skipped.
    assert labels == ["notify:10:v1::1", "notify:10:v1::1"]
    assert queue_length(redis_url, queues["high"]) == 0


def test_a_message_whose_key_is_held_by_a_live_owner_waits_for_the_lease(
    idem_backend, idem_store, start_worker
):
    from celery import current_app

    key = f"{idem_notify.name}:notify:12:v1"
    # The worker starts first: its start-up time must not eat into the lease below.
    worker = start_worker(["high"])
    # Another owner holds the key for 2 more seconds (e.g. a slow first run elsewhere).
    held = idem_store.start(
        key,
        task_name=idem_notify.name,
        task_id="holder",
        fingerprint="f",
        window=60,
        owner="elsewhere",
        lease=2,
    )
    result = current_app.send_task(
        idem_notify.name, (12, "v1"), queue=settings.CELERY_GUARD_PRIORITY_QUEUES["high"]
    )
    wait_until(lambda: (idem_store.get(key) or {}).get("state") == "succeeded", 60)
    log = worker.log_path.read_text()
    assert f"{idem_notify.name}[{result.id}]: key '{key}' is running in holder; retrying" in log
    # It ran once, after the lease ended, as a takeover with the next fencing token.
    assert labels("notify:12:v1") == [f"notify:12:v1::{held.fencing_token + 1}"]


def test_dedup_and_skip_on_rabbitmq(idem_backend, idem_store, start_worker, amqp_url, queues):
    from kombu import Connection

    from tests.celery_app import app

    with Connection(amqp_url) as conn:
        producer = app.amqp.Producer(conn)
        first = idem_notify.apply_async((20, "v1"), producer=producer)
        again = idem_notify.apply_async((20, "v1"), producer=producer)
        with pytest.raises(IdempotencyConflict):
            idem_notify.apply_async((20, "v1"), {"note": "x"}, producer=producer)
    assert again.id == first.id
    assert queue_length(amqp_url, queues["high"]) == 1
    start_worker(["high"], broker_url=amqp_url, name="amqp-idem")
    key = f"{idem_notify.name}:notify:20:v1"
    wait_until(lambda: (idem_store.get(key) or {}).get("state") == "succeeded", 60)
    assert labels("notify:20:v1") == ["notify:20:v1::1"]


def kill_producer(where, employee_id, test_db_name, grace=2.0):
    """Run ``tests.support.idem_producer_crash`` (SIGKILLed at ``where``); return its key."""
    env = {
        **os.environ,
        "CG_WORKER_DB_NAME": test_db_name,
        "CG_IDEMPOTENCY_PUBLISH_GRACE": str(grace),
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "example_project")]),
    }
    cmd = [sys.executable, "-m", "tests.support.idem_producer_crash", str(employee_id), "v1", where]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-3000:]
    key = f"{idem_notify.name}:notify:{employee_id}:v1"
    return key


def wait_past(deadline):
    time.sleep(max(0.0, deadline.timestamp() - time.time()) + 0.2)


def test_a_producer_killed_between_claim_and_publish_does_not_lose_the_job(
    idem_backend, idem_store, start_worker, redis_url, queues, empty_queues, test_db_name, caplog
):
    key = kill_producer("publish", 30, test_db_name)
    record = idem_store.get(key)
    dead_id, deadline = record["task_id"], record["lease_expires_at"]
    assert (record["state"], record["owner"]) == ("pending", "")  # claimed, never confirmed
    assert queue_length(redis_url, queues["high"]) == 0  # died before the publish

    # Inside the grace the claim may still be publishing: a duplicate, nothing published.
    assert idem_notify.delay(30, "v1").id == dead_id
    assert time.time() < deadline.timestamp()  # the duplicate was decided inside the grace
    assert queue_length(redis_url, queues["high"]) == 0

    # After it the claim was abandoned: the next enqueue takes the key over and publishes.
    wait_past(deadline)
    caplog.set_level(logging.WARNING, logger="celery_guard")
    result = idem_notify.delay(30, "v1")
    assert result.id != dead_id
    assert f"took key '{key}' over from {dead_id}" in caplog.text
    assert queue_length(redis_url, queues["high"]) == 1
    assert idem_notify.delay(30, "v1").id == result.id  # confirmed: dedup as usual
    assert queue_length(redis_url, queues["high"]) == 1

    start_worker(["high"])
    wait_until(lambda: (idem_store.get(key) or {}).get("state") == "succeeded", 60)
    assert labels("notify:30:v1") == ["notify:30:v1::1"]  # the job ran, once
    assert idem_store.get(key)["task_id"] == result.id
    assert queue_length(redis_url, queues["high"]) == 0


def test_a_producer_killed_between_publish_and_confirm_costs_a_duplicate_run_once(
    idem_backend, idem_store, start_worker, redis_url, queues, empty_queues, test_db_name
):
    key = kill_producer("confirm", 31, test_db_name)
    record = idem_store.get(key)
    dead_id = record["task_id"]
    assert record["lease_expires_at"] is not None  # published, never confirmed
    assert queue_length(redis_url, queues["high"]) == 1
    wait_past(record["lease_expires_at"])
    # The ledger cannot tell this from a claim that never published: the key is taken over
    # and a second message goes out; the worker-side guard runs the body once for both.
    result = idem_notify.delay(31, "v1")
    assert result.id != dead_id
    assert queue_length(redis_url, queues["high"]) == 2
    worker = start_worker(["high"])
    wait_until(lambda: "skipped: key" in worker.log_path.read_text(errors="replace"), 60)
    wait_until(lambda: queue_length(redis_url, queues["high"]) == 0, 10)
    assert idem_store.get(key)["state"] == "succeeded"
    assert labels("notify:31:v1") == ["notify:31:v1::1"]


def test_a_published_message_the_broker_lost_does_not_block_its_key_past_the_start_by(
    idem_backend,
    idem_store,
    start_worker,
    redis_url,
    queues,
    empty_queues,
    settings,
    celery_conf,
    caplog,
):
    # The bound: no countdown + a 1 s visibility timeout + a 1 s start grace.
    settings.CELERY_GUARD_IDEMPOTENCY_START_GRACE = 1
    celery_conf(broker_transport_options={"visibility_timeout": 1})
    key = f"{idem_notify.name}:notify:40:v1"
    lost = idem_notify.delay(40, "v1")
    record = idem_store.get(key)
    assert (record["state"], record["lease_expires_at"]) == ("pending", None)  # confirmed
    redis.Redis.from_url(redis_url).delete(queues["high"])  # the broker loses the message

    # Before the bound the message may still be queued: the re-enqueue is a duplicate.
    assert idem_notify.delay(40, "v1").id == lost.id
    assert time.time() < record["start_by"].timestamp()  # decided before the bound
    assert queue_length(redis_url, queues["high"]) == 0

    wait_past(record["start_by"])
    caplog.set_level(logging.WARNING, logger="celery_guard")
    again = idem_notify.delay(40, "v1")
    assert again.id != lost.id
    assert f"took key '{key}' over from {lost.id}, which was published but never" in caplog.text
    assert queue_length(redis_url, queues["high"]) == 1
    start_worker(["high"])
    wait_until(lambda: (idem_store.get(key) or {}).get("state") == "succeeded", 60)
    assert labels("notify:40:v1") == ["notify:40:v1::1"]  # the job ran, once
    assert idem_store.get(key)["task_id"] == again.id
