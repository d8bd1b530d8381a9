"""A run item whose worker was SIGKILLed and whose message is gone: the sweep ends it."""

import signal

import pytest

from celery_guard import start_run
from celery_guard.models import BulkRun, BulkRunItem
from celery_guard.runs import launch
from tests.support.harness import wait_until
from tests.testapp.models import Execution
from tests.testapp.run_tasks import run_complete, run_kill_once

pytestmark = pytest.mark.django_db(transaction=True)


def test_the_sweep_ends_an_item_whose_worker_died_and_whose_message_is_gone(
    start_worker, empty_queues, tmp_path, settings, celery_conf
):
    # The killed worker's message comes back only after an hour (Redis's default visibility
    # timeout): for this test it is gone, as when kombu lost it between pop and unacked.
    first = start_worker(["high"], concurrency=1, extra_env={"CG_IDEMPOTENCY_LEASE": "1"})
    marker = tmp_path / "killed"
    run = start_run(
        run_kill_once,
        [{"n": n, "marker": str(marker)} for n in range(3)],
        on_complete=run_complete.si(label="swept"),
    )
    first.process.wait(60)
    assert first.process.returncode == -signal.SIGKILL
    start_worker(["high"], concurrency=1)
    wait_until(lambda: BulkRun.objects.get(pk=run.pk).succeeded == 2, 60)
    item = BulkRunItem.objects.get(run=run, seq=0)
    assert (item.status, BulkRun.objects.get(pk=run.pk).status) == ("running", "running")

    # The sweep of a deployment with a short visibility timeout and start grace.
    settings.CELERY_GUARD_RUNS_SWEEP_GRACE = 0
    settings.CELERY_GUARD_IDEMPOTENCY_START_GRACE = 0.1
    celery_conf(broker_transport_options={"visibility_timeout": 0})
    wait_until(lambda: launch.sweep()["items"] == 1, 30, 0.5)
    wait_until(lambda: BulkRun.objects.get(pk=run.pk).finished_at is not None, 60)
    run.refresh_from_db()
    assert (run.status, run.succeeded, run.failed, run.pending) == ("succeeded", 3, 0, 0)
    labels = Execution.objects.filter(label__startswith="kill-item:").values_list("label")
    assert sorted(label for (label,) in labels) == [f"kill-item:{n}" for n in range(3)]
    wait_until(lambda: Execution.objects.filter(label="complete:swept").exists(), 30)
    assert launch.sweep() == {"items": 0, "completions": 0}
