"""Queue depth from RabbitMQ (passive declare); the oldest message's age is not measurable
there without consuming, so it is ``None``."""

from __future__ import annotations

import time
import uuid

from kombu import Connection, Exchange, Queue

from celery_guard.core import headers
from celery_guard.observability import broker


def test_rabbitmq_depth_counts_waiting_messages_and_the_age_is_unknown(amqp_url):
    name = f"cg-depth-{uuid.uuid4().hex[:8]}"
    queue = Queue(name, Exchange(name, type="direct"), routing_key=name, auto_delete=False)
    # Publisher confirms: each publish returns once RabbitMQ has queued the message, so the
    # depth read next cannot race messages still in flight (seen under load: 1 of 3).
    with Connection(amqp_url, transport_options={"confirm_publish": True}) as conn:
        producer = conn.Producer()
        for n in range(3):
            producer.publish(
                {"n": n},
                exchange=queue.exchange,
                routing_key=name,
                declare=[queue],
                headers={headers.HEADER: {"v": headers.VERSION, "sent_at": time.time() - 60}},
            )
        try:
            states = broker.read(amqp_url, [name, f"{name}-never-declared", name])
        finally:
            queue.bind(conn.default_channel).delete()
    assert states == [
        broker.QueueState(name, 3, None),
        broker.QueueState(f"{name}-never-declared", 0, None),
    ]


def test_an_unreachable_broker_gives_unknown_depths():
    states = broker.read("amqp://guest:guest@127.0.0.1:1//", ["q"])
    assert states == [broker.QueueState("q", None, None)]
