"""Idempotency on real services: racing producers, a SIGKILLed worker, retries, conflicts."""

import base64
import collections
import json
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
from tests.harness import ROOT, queue_length, wait_until
from tests.idem_support import redis_keys
from tests.testapp.idem_tasks import idem_crash, idem_notify, idem_race, idem_retry
from tests.testapp.models import Execution

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

PROCESSES, ENQUEUES, KEYS = 8, 500, 1000


def queued_messages(redis_url, queue):
    client = redis.Redis.from_url(redis_url)
    return [json.loads(raw) for raw in client.lrange(queue, 0, -1)]


def test_racing_producers_publish_each_key_once(
    backend, store, redis_url, queues, empty_queues, test_db_name, tmp_path
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
            "tests.idem_race",
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
    if backend == "database":
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
        assert store.get(f"{idem_race.name}:race:{n}")["task_id"] in ids_by_key[n]


@pytest.mark.parametrize("when", ["after_return", "atomic"])
def test_sigkilled_worker_redelivers_and_the_body_does_not_run_again(
    when, backend, start_worker, redis_url, queues, tmp_path
):
    if when == "atomic" and backend == "redis":
        pytest.skip("transactional completion needs the database ledger")
    env = {"CG_VISIBILITY_TIMEOUT": "1"}
    marker = tmp_path / "killed"
    first = start_worker(["high"], extra_env=env)
    result = idem_crash.delay(f"crash-{when}", marker=str(marker), when=when)
    wait_until(lambda: first.process.poll() is not None, timeout=60)
    assert first.process.returncode == -signal.SIGKILL
    assert marker.exists()
    assert Execution.objects.filter(label=f"crash-{when}").count() == 1
    # The message was not acked: after the visibility timeout Redis gives it to the new worker.
    time.sleep(1.5)
    second = start_worker(["high"], extra_env=env)
    wait_until(lambda: "skipped: key" in second.log_path.read_text(errors="replace"), 60)
    assert f"{idem_crash.name}[{result.id}] skipped" in second.log_path.read_text()
    assert Execution.objects.filter(label=f"crash-{when}").count() == 1
    wait_until(lambda: queue_length(redis_url, queues["high"]) == 0, 10)


def test_a_celery_retry_of_the_same_task_runs_again_under_a_new_token(backend, store, start_worker):
    start_worker(["high"])
    result = idem_retry.delay("r")
    key = f"{idem_retry.name}:retry:r"
    wait_until(lambda: (store.get(key) or {}).get("state") == "succeeded", 60)
    labels = sorted(Execution.objects.values_list("label", flat=True))
    assert labels == ["r:0:1", "r:1:2"]  # attempt 2 ran, with a higher fencing token
    record = store.get(key)
    assert (record["task_id"], record["fencing_token"]) == (result.id, 2)


def test_enqueue_dedup_and_worker_skip_end_to_end(backend, store, start_worker, redis_url, queues):
    first = idem_notify.delay(10, "v1")
    assert idem_notify.delay(10, "v1").id == first.id
    with pytest.raises(IdempotencyConflict):
        idem_notify.delay(10, "v1", note="other")
    assert queue_length(redis_url, queues["high"]) == 1
    worker = start_worker(["high"])
    key = f"{idem_notify.name}:notify:10:v1"
    wait_until(lambda: (store.get(key) or {}).get("state") == "succeeded", 60)
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
