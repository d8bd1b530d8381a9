"""Durable, timely delivery on real workers: the outbox and the schedule (docs/delivery.md)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
from django.db import transaction

from celery_guard.models import OutboxMessage
from tests.harness import ROOT, wait_until
from tests.testapp.models import Execution
from tests.testapp.outbox_tasks import outbox_job

pytestmark = [pytest.mark.django_db(transaction=True)]


def labels(prefix: str) -> Counter[str]:
    """How many times each run labelled ``prefix...`` ran."""
    return Counter(
        Execution.objects.filter(label__startswith=prefix).values_list("label", flat=True)
    )


def run_producer(test_db_name: str, broker_url: str, *args: str) -> int:
    """Run ``tests.outbox_producer`` with ``args``; return its exit status."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "example_project")]),
        "CG_WORKER_DB_NAME": test_db_name,
        "CELERY_BROKER_URL": broker_url,
    }
    process = subprocess.run(
        [sys.executable, "-m", "tests.outbox_producer", *args], env=env, cwd=ROOT, timeout=120
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
