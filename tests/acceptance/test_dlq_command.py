"""A ``celery_guard replay`` process SIGKILLed mid-batch, then a real worker runs the rows."""

import signal

import pytest

from celery_guard.idempotency import keys
from celery_guard.models import DeadLetter, DeadLetterReplay
from tests.support.dlq import dead_letter, published, replay_process, run_command
from tests.support.harness import queue_length, wait_until
from tests.testapp import idem_tasks
from tests.testapp.models import Execution

pytestmark = pytest.mark.usefixtures("empty_queues")


@pytest.mark.django_db(transaction=True)
def test_a_replay_killed_mid_batch_loses_nothing_and_each_key_runs_once(
    test_db_name, redis_url, queues, start_worker
):
    high = queues["high"]
    name = idem_tasks.idem_notify.name
    rows = [
        dead_letter(
            f"crash{n}",
            task_name=name,
            queue=high,
            args=[n, "v1"],
            headers={"celery_guard": {"v": 1, "attempt": 2, "priority": "high"}},
            idempotency_key=keys.namespaced(name, f"notify:{n}:v1"),
        )
        for n in range(30)
    ]
    # 20/s makes batches of 10 (half a second of publishing each): killed after 3 publishes,
    # the first batch has published but not committed its claim.
    proc = replay_process(test_db_name, redis_url, "--rate", "20/s", "--no-progress")
    wait_until(lambda: queue_length(redis_url, high) >= 3, timeout=60, interval=0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    early = {
        headers["id"]: headers["celery_guard"]["replay_of"]
        for headers, _, _ in published(redis_url, high)
    }
    recorded = set(DeadLetterReplay.objects.values_list("task_id", flat=True))
    assert recorded <= set(early)  # every committed claim was published
    orphans = {dl for task_id, dl in early.items() if task_id not in recorded}
    assert orphans  # published before the kill, claim never committed
    # Those dead letters are dead still, not "replayed" without a run: nothing is lost.
    assert set(DeadLetter.objects.filter(pk__in=orphans).values_list("status", flat=True)) == {
        "dead"
    }

    out, _ = run_command("replay", "--rate", "1000/s", "--no-progress")
    assert f"{30 - len(recorded)} replayed" in out
    assert set(
        DeadLetter.objects.filter(pk__in=[r.pk for r in rows]).values_list("status", flat=True)
    ) == {"replayed"}
    duplicates = len(orphans)
    assert queue_length(redis_url, high) == 30 + duplicates  # at least once, not exactly once

    worker = start_worker(["high"])
    wait_until(lambda: Execution.objects.filter(task=name).count() == 30, timeout=60)
    # The duplicates of the killed batch ran into their keys and were skipped.
    wait_until(lambda: worker.log_tail(400).count("already succeeded") == duplicates, timeout=30)
    labels = list(Execution.objects.filter(task=name).values_list("label", flat=True))
    assert len(set(labels)) == 30 == len(labels)
