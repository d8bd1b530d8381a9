"""Priority routing at enqueue time on the real broker: payload checks, publishing on commit."""

import pytest
from django.db import transaction

from celery_guard import PayloadError
from tests.support.harness import queue_length
from tests.testapp import tasks

pytestmark = pytest.mark.django_db(transaction=True)


def test_bad_payloads_raise_and_publish_nothing(redis_url, queues, empty_queues):
    import datetime

    with pytest.raises(PayloadError, match=r"kwargs\['when'\]: datetime is not JSON serializable"):
        tasks.high_job.apply_async(("x",), {"sleep_ms": 0, "when": datetime.datetime.now()})
    with pytest.raises(PayloadError, match="over CELERY_GUARD_MAX_PAYLOAD_BYTES"):
        tasks.high_job.delay("x" * 300_000)
    with pytest.raises(TypeError, match="unknown guard option 'priorty'"):
        tasks.high_job.apply_async(("x",), guard={"priorty": "low"})
    with pytest.raises(ValueError, match="'urgent' is not a priority level"):
        tasks.high_job.apply_async(("x",), guard={"priority": "urgent"})
    assert all(queue_length(redis_url, q) == 0 for q in queues.values())
    tasks.high_job.delay("ok")  # the same path does publish when the payload is fine
    assert queue_length(redis_url, queues["high"]) == 1


def test_delay_on_commit_checks_now_and_publishes_after_commit(redis_url, queues, empty_queues):
    with transaction.atomic():
        with pytest.raises(PayloadError, match=r"args\[0\]: set is not JSON serializable"):
            tasks.high_job.delay_on_commit({1})
        tasks.high_job.delay_on_commit("committed")
        assert queue_length(redis_url, queues["high"]) == 0
    assert queue_length(redis_url, queues["high"]) == 1
    with pytest.raises(RuntimeError), transaction.atomic():
        tasks.low_job.delay_on_commit("rolled back")
        raise RuntimeError
    assert queue_length(redis_url, queues["low"]) == 0
