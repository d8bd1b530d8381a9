"""Durable, timely delivery on real workers: the outbox and the schedule (docs/delivery.md)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter

import pytest
import redis
from django.db import transaction
from django.utils import timezone

from celery_guard.models import OutboxMessage
from tests.support.harness import ARTIFACTS, ROOT, purge, wait_until
from tests.testapp.models import Execution
from tests.testapp.outbox_tasks import outbox_job, sched_flaky, sched_job, sched_throttled

pytestmark = [pytest.mark.django_db(transaction=True)]


def labels(prefix: str) -> Counter[str]:
    """How many times each run labelled ``prefix...`` ran."""
    return Counter(
        Execution.objects.filter(label__startswith=prefix).values_list("label", flat=True)
    )


def run_producer(test_db_name: str, broker_url: str, *args: str) -> int:
    """Run ``tests.support.outbox_producer`` with ``args``; return its exit status."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "example_project")]),
        "CG_WORKER_DB_NAME": test_db_name,
        "CELERY_BROKER_URL": broker_url,
    }
    process = subprocess.run(
        [sys.executable, "-m", "tests.support.outbox_producer", *args],
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    return process.returncode


def test_outbox_rollback_publishes_nothing_commit_runs_once(start_worker, queues) -> None:
    start_worker(["default"])
    with pytest.raises(RuntimeError), transaction.atomic():
        outbox_job.delay_on_commit("rolled-back")
        raise RuntimeError("the request fails")
    with transaction.atomic():
        outbox_job.delay_on_commit("committed")
    wait_until(lambda: labels("committed"), timeout=30)
    assert not OutboxMessage.objects.filter(args=["rolled-back"]).exists()
    time.sleep(3)  # a grace period for a duplicate or the rolled-back job to show up
    assert labels("committed") == {"committed": 1}
    assert labels("rolled-back") == Counter()
    assert OutboxMessage.objects.get(args=["committed"]).state == "dispatched"


def test_producer_killed_between_commit_and_publish_runs_once(
    start_worker, redis_url, test_db_name
) -> None:
    status = run_producer(test_db_name, redis_url, "kill", "killed", "3")
    assert status == -signal.SIGKILL
    assert OutboxMessage.objects.filter(state="pending").count() == 3
    start_worker(["default"])
    wait_until(lambda: len(labels("killed-")) == 3, timeout=60)
    time.sleep(3)
    assert labels("killed-") == {f"killed-{i}": 1 for i in range(3)}
    assert not OutboxMessage.objects.filter(state="pending").exists()


def fill_backlog(count: int, prefix: str) -> None:
    """Queue ``count`` quick jobs on the default queue through one producer."""
    with sched_job.app.producer_or_acquire() as producer:
        for i in range(count):
            sched_job.apply_async((f"{prefix}-{i}",), producer=producer)


@pytest.mark.parametrize(
    ("task", "wait"), [(sched_flaky, 1.0), (sched_throttled, 2.0)], ids=["backoff-1s", "429"]
)
def test_retry_runs_on_time_ahead_of_the_backlog(start_worker, task, wait) -> None:
    backlog = 3000
    task.delay("first")
    fill_backlog(backlog, "backlog")
    start_worker(["default"])
    runs = wait_until(
        lambda: (
            list(Execution.objects.filter(label="first").order_by("started_at")) or None
            if Execution.objects.filter(label="first").count() >= 2
            else None
        ),
        timeout=60,
    )
    first, retry = runs[0], runs[1]
    late = retry.started_at - (first.finished_at + wait)
    behind = Execution.objects.filter(
        label__startswith="backlog-", started_at__lt=retry.started_at
    ).count()
    assert late < 2.0, f"the retry started {late:.2f}s after its due time"
    assert behind < backlog, "the retry waited for the whole backlog"


def test_long_countdown_runs_once_on_time_despite_visibility_timeout(start_worker) -> None:
    start_worker(["default"], extra_env={"CG_VISIBILITY_TIMEOUT": "10"})
    due = time.time() + 40
    sched_job.apply_async(("long-countdown",), countdown=40)
    wait_until(lambda: labels("long-countdown"), timeout=70)
    run = Execution.objects.get(label="long-countdown")
    assert abs(run.started_at - due) < 1.0
    time.sleep(12)  # past another visibility timeout: no redelivery of a held ETA message
    assert labels("long-countdown") == {"long-countdown": 1}


def pending_rows(prefix: str, count: int) -> None:
    """Committed outbox rows whose producer died before publishing (as ``write_outbox`` writes)."""
    now = timezone.now()
    rows = []
    for i in range(count):
        task_id = str(uuid.uuid4())
        rows.append(
            OutboxMessage(
                task_name=outbox_job.name,
                task_id=task_id,
                args=[f"{prefix}-{i}"],
                guard={"idempotency_key": f"outbox:{task_id}"},
                created_at=now,
                due_at=now,
            )
        )
    OutboxMessage.objects.bulk_create(rows)


def python_process(module: str, test_db_name: str, broker_url: str, **env: str) -> subprocess.Popen:
    """Start ``python -m module`` with the suite's settings."""
    full_env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "example_project")]),
        "CG_WORKER_DB_NAME": test_db_name,
        "CELERY_BROKER_URL": broker_url,
        **env,
    }
    ARTIFACTS.mkdir(exist_ok=True)
    log = (ARTIFACTS / f"{module}-{uuid.uuid4().hex[:6]}.log").open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", module],
        env=full_env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def test_two_pollers_at_once_run_each_row_once(start_worker, test_db_name, redis_url) -> None:
    pending_rows("pair", 300)
    relay = python_process("tests.support.outbox_relay", test_db_name, redis_url)
    try:
        start_worker(["default"])
        start_worker(["default"])
        wait_until(lambda: len(labels("pair-")) == 300, timeout=90)
        time.sleep(3)
    finally:
        relay.kill()
        relay.wait()
    assert set(labels("pair-").values()) == {1}
    assert not OutboxMessage.objects.filter(state="pending").exists()


def test_poller_killed_mid_batch_loses_nothing(start_worker, test_db_name, redis_url) -> None:
    pending_rows("midbatch", 300)
    relay = python_process(
        "tests.support.outbox_relay",
        test_db_name,
        redis_url,
        CG_DELIVERY_LEASE="3",
        CG_DELIVERY_BATCH="50",
    )
    try:
        wait_until(
            lambda: OutboxMessage.objects.filter(state="dispatched").count() >= 20, timeout=60
        )
    finally:
        relay.send_signal(signal.SIGKILL)
        relay.wait()
    assert OutboxMessage.objects.filter(state="pending").exists(), "the batch was not cut"
    start_worker(["default"], extra_env={"CG_DELIVERY_LEASE": "3"})
    wait_until(lambda: len(labels("midbatch-")) == 300, timeout=90)
    time.sleep(3)
    assert set(labels("midbatch-").values()) == {1}


@pytest.fixture
def private_redis():
    """A redis-server of this test's own on a free port (never the shared one), restartable."""
    binary = shutil.which("redis-server") or "redis-server"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    processes: list[subprocess.Popen] = []

    def start() -> None:
        processes.append(
            subprocess.Popen(
                [binary, "--port", str(port), "--save", "", "--appendonly", "no"],
                stdout=subprocess.DEVNULL,
            )
        )
        client = redis.Redis(port=port)
        wait_until(lambda: _pings(client), timeout=10)

    def stop() -> None:
        processes[-1].terminate()
        processes[-1].wait(10)

    start()
    yield f"redis://127.0.0.1:{port}/0", start, stop
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def test_broker_down_rows_wait_and_all_run_once_after(
    private_redis, start_worker, test_db_name
) -> None:
    # private_redis first: it is torn down after the worker fixture purges its queues.
    url, start, stop = private_redis
    start_worker(["default"], broker_url=url)
    stop()
    status = run_producer(test_db_name, url, "commit", "outage", "100")
    assert status == 0, "a commit raised while the broker was down"
    assert OutboxMessage.objects.filter(state="pending").count() == 100
    time.sleep(5)
    start()
    wait_until(lambda: len(labels("outage-")) == 100, timeout=90)
    time.sleep(3)
    assert set(labels("outage-").values()) == {1}


def test_retry_on_rabbitmq_goes_through_the_database_schedule(start_worker, amqp_url) -> None:
    start_worker(["default"], broker_url=amqp_url, name="amqp-sched")
    from kombu import Connection

    with Connection(amqp_url) as conn:
        sched_flaky.apply_async(("rabbit-retry",), producer=sched_flaky.app.amqp.Producer(conn))
    wait_until(lambda: labels("rabbit-retry")["rabbit-retry"] == 2, timeout=60)
    held = OutboxMessage.objects.get(task_name=sched_flaky.name)
    assert held.prepared and held.state == "dispatched" and held.attempt == 1


def test_retry_on_rabbitmq_runs_on_time_ahead_of_the_backlog(start_worker, amqp_url, queues):
    """The due message goes to ``<queue>.cg-due``, which the worker consumes as well."""
    from kombu import Connection

    from celery_guard.delivery import schedule

    # The backlog is large enough that the worker cannot drain it while the retry is due (it
    # runs a few hundred of these no-op jobs a second).
    backlog = 3000
    due_queue = schedule.due_queue(queues["default"]).name
    try:
        with Connection(amqp_url) as conn:
            producer = sched_flaky.app.amqp.Producer(conn)
            sched_flaky.apply_async(("rabbit-first",), producer=producer)
            for i in range(backlog):
                sched_job.apply_async((f"rabbit-backlog-{i}",), producer=producer)
        start_worker(["default"], broker_url=amqp_url, name="amqp-due")
        runs = wait_until(
            lambda: (
                list(Execution.objects.filter(label="rabbit-first").order_by("started_at"))
                if Execution.objects.filter(label="rabbit-first").count() >= 2
                else None
            ),
            timeout=60,
        )
        first, retry = runs[0], runs[1]
        late = retry.started_at - (first.finished_at + 1.0)
        behind = Execution.objects.filter(
            label__startswith="rabbit-backlog-", started_at__lt=retry.started_at
        ).count()
        assert late < 2.0, f"the retry started {late:.2f}s after its due time"
        assert behind < backlog, f"the retry waited behind the whole backlog ({behind} jobs)"
        assert retry.queue == due_queue
    finally:
        purge(amqp_url, [due_queue])
