"""Priority routing on real workers (Redis and RabbitMQ) with records written by the tasks."""

import pytest
from django.conf import settings
from kombu import Connection

from celery_guard.core import headers
from tests.support.harness import wait_until
from tests.testapp import tasks
from tests.testapp.models import Execution

pytestmark = pytest.mark.django_db(transaction=True)


def executions(count, timeout=60):
    return wait_until(
        lambda: list(Execution.objects.all()) if Execution.objects.count() >= count else None,
        timeout,
    )


def test_high_jobs_overtake_a_low_backlog(start_worker, queues):
    start_worker(["low"], name="low")
    start_worker(["high"], name="high")
    for i in range(200):
        tasks.low_job.delay(f"low-{i}", sleep_ms=50)
    for i in range(5):
        tasks.high_job.delay(f"high-{i}")

    runs = executions(205, timeout=120)
    low = [r for r in runs if r.label.startswith("low-")]
    high = [r for r in runs if r.label.startswith("high-")]
    assert len(low) == 200 and len(high) == 5
    assert {r.queue for r in low} == {queues["low"]}
    assert {r.queue for r in high} == {queues["high"]}
    backlog_drained = max(r.started_at for r in low)
    assert all(r.started_at < backlog_drained for r in high), (
        [r.started_at for r in high],
        backlog_drained,
    )


def test_levels_per_call_override_and_unguarded_tasks(start_worker, queues):
    start_worker(["high", "default", "low", settings.CELERY_TASK_DEFAULT_QUEUE], concurrency=2)
    tasks.default_job.delay("default")
    tasks.high_job.apply_async(("overridden",), guard={"priority": "low"})
    tasks.plain_job.delay("plain")

    runs = {r.label: r for r in executions(3)}
    assert runs["default"].queue == queues["default"]
    assert runs["default"].guard_header["priority"] == "default"
    assert runs["overridden"].queue == queues["low"]
    assert runs["overridden"].guard_header["priority"] == "low"
    # Unguarded tasks are untouched: Celery's default queue, no guard header.
    assert runs["plain"].queue == settings.CELERY_TASK_DEFAULT_QUEUE
    assert runs["plain"].guard_header is None


def test_guard_header_is_stamped_and_kept_across_a_celery_retry(start_worker):
    start_worker(["high"])
    tasks.retry_once_job.delay("retry")
    first, second = sorted(executions(2), key=lambda r: r.started_at)
    assert first.guard_header["v"] == headers.VERSION
    assert first.guard_header["attempt"] == 1
    assert second.guard_header["attempt"] == 2
    assert second.guard_header["first_enqueued_at"] == first.guard_header["first_enqueued_at"]
    assert first.guard_header["first_enqueued_at"] <= first.started_at
    assert second.guard_header["priority"] == "high"


def test_routing_on_rabbitmq(start_worker, amqp_url, queues):
    start_worker(["high", "low"], broker_url=amqp_url, name="amqp")
    from tests.celery_app import app

    with Connection(amqp_url) as conn:
        producer = app.amqp.Producer(conn)
        tasks.high_job.apply_async(("rabbit-high",), producer=producer)
        tasks.low_job.apply_async(("rabbit-low",), producer=producer)
        tasks.low_job.apply_async(
            ("rabbit-override",), producer=producer, guard={"priority": "high"}
        )
    runs = {r.label: r for r in executions(3)}
    assert runs["rabbit-high"].queue == queues["high"]
    assert runs["rabbit-low"].queue == queues["low"]
    assert runs["rabbit-override"].queue == queues["high"]
