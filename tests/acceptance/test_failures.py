"""The failure pipeline on real workers: retries with backoff, stops, time limits, poison cap.

Time scale: delays of tenths of a second. Every run is recorded by the task body itself
(``Execution`` rows, with the guard header the run received).
"""

import itertools
import os
import signal
import time

import pytest

from celery_guard.dlq import replay
from celery_guard.models import DeadLetter, Delivery
from tests.support.harness import queue_length, wait_until
from tests.testapp import fail_tasks
from tests.testapp.models import Execution

pytestmark = pytest.mark.django_db(transaction=True)


def runs(label):
    return list(Execution.objects.filter(label=label).order_by("started_at"))


def wait_runs(label, count, timeout=30):
    return wait_until(lambda: runs(label) if len(runs(label)) >= count else None, timeout)


def wait_dead_letter(label, timeout=30):
    return wait_until(lambda: DeadLetter.objects.filter(args__0=label).first(), timeout)


def settle(label, count, seconds=1.0):
    """Check no further run happens for a while (the task was not retried again)."""
    time.sleep(seconds)
    assert len(runs(label)) == count


def test_transient_errors_are_retried_with_jittered_delays(start_worker):
    start_worker(["default"])
    fail_tasks.fail_flaky.delay("flaky", 3)
    attempts = wait_runs("flaky", 4)
    settle("flaky", 4, 0.5)
    bounds = [0.2, 0.4, 0.5]  # min(cap, base * factor ** (n - 1))
    delays = []
    for n, (before, after) in enumerate(itertools.pairwise(attempts), start=1):
        header = after.guard_header
        assert header["attempt"] == n + 1
        assert header["consumed"] == n
        delay = header["delay"]
        assert 0 <= delay <= bounds[n - 1]
        # The retry did not start before its countdown ended.
        assert after.started_at - before.finished_at >= delay - 0.01
        delays.append(delay)
    assert len(set(delays)) == 3  # jittered, not a fixed schedule
    assert [h["kind"] for h in attempts[-1].guard_header["history"]] == ["transient"] * 3
    assert not DeadLetter.objects.exists()
    first = attempts[0].guard_header["first_enqueued_at"]
    assert all(r.guard_header["first_enqueued_at"] == first for r in attempts)


def test_permanent_error_is_dead_lettered_after_one_attempt(start_worker, queues):
    start_worker(["default"])
    fail_tasks.fail_permanent.delay("perm")
    row = wait_dead_letter("perm")
    settle("perm", 1)
    assert row.reason == DeadLetter.Reason.PERMANENT
    assert row.attempts == 1
    assert row.exception_class == "builtins.ValueError"
    assert row.message == "bad input perm"
    assert "ValueError: bad input perm" in row.traceback
    assert row.task_name == fail_tasks.fail_permanent.name
    assert row.queue == queues["default"]
    assert row.args == ["perm"] and row.kwargs == {}
    assert row.status == DeadLetter.Status.DEAD
    assert row.first_enqueued_at is not None and row.first_enqueued_at <= row.failed_at
    assert [h["error"] for h in row.history] == ["builtins.ValueError"]
    assert not Delivery.objects.exists()


def test_max_attempts_is_respected_exactly(start_worker):
    start_worker(["default"])
    fail_tasks.fail_always.delay("always")
    row = wait_dead_letter("always")
    settle("always", 3)
    assert row.reason == DeadLetter.Reason.EXHAUSTED
    assert row.attempts == 3
    assert [h["attempt"] for h in row.history] == [1, 2, 3]
    assert [h["delay"] for h in row.history] == [0.1, 0.1, None]
    assert row.exception_class == "builtins.TimeoutError"


def test_deadline_stops_retries(start_worker):
    start_worker(["default"])
    fail_tasks.fail_deadline.delay("deadline")
    row = wait_dead_letter("deadline")
    attempts = runs("deadline")
    settle("deadline", len(attempts))
    assert row.reason == DeadLetter.Reason.DEADLINE
    assert 1 <= row.attempts == len(attempts) < 10
    first = attempts[0].guard_header["first_enqueued_at"]
    assert all(r.started_at <= first + 1.5 for r in attempts)
    # The retry it refused would have started past the deadline (backoff 0.6s).
    assert attempts[-1].finished_at + 0.6 > first + 1.5


def test_retry_after_from_an_http_response_is_honoured(start_worker):
    start_worker(["default"])
    fail_tasks.fail_retry_after.delay("after")
    first, second = wait_runs("after", 2)
    settle("after", 2, 0.3)
    assert second.guard_header["delay"] >= 1.0  # backoff 0.05s raised to Retry-After: 1
    assert second.started_at - first.finished_at >= 1.0 - 0.01
    assert second.guard_header["history"][0]["kind"] == "transient"


def test_throttled_reschedules_do_not_consume_attempts(start_worker):
    start_worker(["default"])
    # max_attempts=1: any consumed attempt would end in the dead-letter queue.
    fail_tasks.fail_throttled.delay("throttled", 3)
    attempts = wait_runs("throttled", 4)
    settle("throttled", 4, 0.5)
    last = attempts[-1].guard_header
    assert last["consumed"] == 0 and last["throttled"] == 3
    assert [h["kind"] for h in last["history"]] == ["throttled"] * 3
    for before, after in itertools.pairwise(attempts):
        assert after.started_at - before.finished_at >= 0.2 - 0.01
    assert not DeadLetter.objects.exists()


def test_soft_time_limit_is_retried(start_worker):
    start_worker(["default"])
    fail_tasks.fail_soft_limit.delay("soft")
    _first, second = wait_runs("soft", 2)
    settle("soft", 2, 0.5)
    assert second.guard_header["consumed"] == 1
    [entry] = second.guard_header["history"]
    assert entry["error"] == "billiard.exceptions.SoftTimeLimitExceeded"
    assert entry["kind"] == "transient"
    assert not DeadLetter.objects.exists()


def test_hard_time_limit_counts_as_an_attempt(start_worker):
    start_worker(["default"])
    fail_tasks.fail_hard_limit.delay("hard")
    row = wait_dead_letter("hard", timeout=30)
    settle("hard", 2)
    assert row.reason == DeadLetter.Reason.TIMEOUT
    assert row.attempts == 2
    assert row.exception_class == "billiard.exceptions.TimeLimitExceeded"
    assert not Delivery.objects.exists()


def check_poison_cap(worker, broker_url, queue):
    row = wait_dead_letter("kill", timeout=90)
    # CELERY_GUARD_MAX_WORKER_LOST = 3: three deliveries died, the fourth did not run.
    settle("kill", 3)
    assert row.reason == DeadLetter.Reason.WORKER_LOST
    assert row.exception_class == "celery_guard.exceptions.PoisonMessageError"
    assert row.args == ["kill"]
    assert queue_length(broker_url, queue) == 0
    assert not Delivery.objects.exists()
    assert worker.process.poll() is None  # the worker itself survived
    assert worker.log_path.read_text().count("redelivered after its worker process was lost") == 3


def test_a_task_killing_its_worker_is_dead_lettered_after_the_cap(start_worker, redis_url, queues):
    worker = start_worker(["default"], concurrency=1, pool="prefork")
    fail_tasks.fail_kill_self.delay("kill")
    check_poison_cap(worker, redis_url, queues["default"])


def test_poison_cap_on_rabbitmq(start_worker, amqp_url, queues):
    from kombu import Connection

    from tests.celery_app import app

    worker = start_worker(["default"], broker_url=amqp_url, concurrency=1, pool="prefork")
    with Connection(amqp_url) as conn:
        fail_tasks.fail_kill_self.apply_async(("kill",), producer=app.amqp.Producer(conn))
    check_poison_cap(worker, amqp_url, queues["default"])


def test_a_warm_shutdown_restoring_prefetched_messages_is_not_a_lost_delivery(
    start_worker, redis_url, queues
):
    # One lost delivery would be the cap: a restored message that never ran must not count.
    env = {"CG_PREFETCH_MULTIPLIER": "4", "CG_MAX_WORKER_LOST": "1"}
    first = start_worker(["default"], concurrency=1, extra_env=env)
    fail_tasks.fail_note_redelivery.delay("blocker", 3000)
    for n in range(3):
        fail_tasks.fail_note_redelivery.delay(f"prefetched-{n}")
    # The worker holds all four: one running, three prefetched behind it.
    wait_until(lambda: queue_length(redis_url, queues["default"]) == 0, timeout=30)
    # Warm shutdown (the main process only): the running one finishes, the prefetched go back.
    os.kill(first.pid, signal.SIGTERM)
    first.process.wait(30)
    assert [r.label for r in runs("blocker")] == ["blocker"]
    assert queue_length(redis_url, queues["default"]) == 3

    second = start_worker(["default"], concurrency=1, extra_env=env)
    labels = [f"prefetched-{n}:redelivered" for n in range(3)]
    wait_until(lambda: Execution.objects.filter(label__in=labels).count() == 3, timeout=30)
    settle("prefetched-0:redelivered", 1)
    assert not DeadLetter.objects.exists()
    assert not Delivery.objects.exists()
    assert "lost" not in second.log_path.read_text()


def test_a_dead_letter_replays_with_send_task(start_worker, queues):
    from tests.celery_app import app

    start_worker(["default"])
    fail_tasks.fail_until_fixed.apply_async(("replay",), {"count": 2})
    row = wait_dead_letter("replay")
    assert row.reason == DeadLetter.Reason.PERMANENT
    assert not runs("replay")
    now = time.time()
    Execution.objects.create(
        task="fix", label="fixed:replay", queue="", hostname="", started_at=now, finished_at=now
    )

    app.send_task(row.task_name, **replay.replay_options(row))

    [run] = wait_runs("replay", 1)
    assert run.queue == queues["default"]
    assert run.guard_header["attempt"] == 1
    assert run.guard_header["priority"] == "default"
    assert "history" not in run.guard_header
    assert run.guard_header["first_enqueued_at"] > row.first_enqueued_at.timestamp()
    assert DeadLetter.objects.count() == 1
