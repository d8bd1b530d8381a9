"""The schedule's broker side: the Redis capture against kombu, the due queues on RabbitMQ."""

from __future__ import annotations

import json
import time
import uuid

import pytest
import redis
from celery import Celery, current_app
from django.conf import settings
from kombu import Connection

from celery_guard.delivery import schedule


@pytest.mark.parametrize("priority", [None, 5])
def test_a_held_message_is_the_one_kombu_pushes_to_the_same_list(redis_url, priority):
    app = current_app._get_current_object()
    queue = f"cgt-{settings.RUN_ID}-hold-{uuid.uuid4().hex[:6]}"
    task_id = str(uuid.uuid4())
    client = redis.Redis.from_url(redis_url)

    def publish(producer=None):
        return app.send_task(
            "tests.nothing",
            ["a"],
            task_id=task_id,
            queue=queue,
            priority=priority,
            producer=producer,
        )

    held = schedule.RedisSchedule(app)
    try:
        publish()  # pushed by kombu for real
        [pushed_to] = client.keys(f"{queue}*")
        pushed = json.loads(client.lindex(pushed_to, 0))
        held.hold(time.time() + 3600, publish)
        [member] = [m for m in client.zrange(held.key, 0, -1) if task_id.encode() in m]
        item = json.loads(member)
        kept = json.loads(item["m"])
        assert item["k"].encode() == pushed_to
        assert pushed_to == (queue.encode() + (b"\x06\x163" if priority else b""))
        # The delivery tag is a fresh uuid per publish; everything else is the same message.
        for message in (pushed, kept):
            assert uuid.UUID(message["properties"].pop("delivery_tag"))
        assert kept == pushed
    finally:
        for member in client.zrange(held.key, 0, -1):
            if task_id.encode() in member:
                client.zrem(held.key, member)
        client.delete(*client.keys(f"{queue}*"), f"_kombu.binding.{queue}")


def test_due_messages_go_to_the_due_queue_only_while_a_worker_consumes_it(amqp_url):
    """RabbitMQ: a due queue nobody consumes is never published to (no message stranded)."""
    app = Celery(broker=amqp_url, set_as_current=False)
    name = f"cgt-{settings.RUN_ID}-due-{uuid.uuid4().hex[:6]}"
    retry = {"exchange": name, "routing_key": name, "priority": 3}
    assert schedule.DueQueues(app).redirect("t", [], {}, dict(retry)) == retry
    due = schedule.due_queue(name)
    with Connection(amqp_url) as conn:
        consumer = conn.Consumer(due, callbacks=[lambda body, message: None])
        consumer.consume()
        try:
            moved = schedule.DueQueues(app).redirect("t", [], {}, dict(retry))
            assert moved == {"queue": due, "priority": 3}
            assert schedule.DueQueues(app).redirect("t", [], {}, {"queue": name})["queue"] == due
        finally:
            consumer.cancel()
            due(conn.default_channel).delete()
