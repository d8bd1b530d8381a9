"""Queue depth and the age of the oldest message, read from the broker (no consuming).

Redis: ``LLEN`` of the queue's list and of Celery's priority sub-lists (``queue\\x06\\x16N``),
and the oldest message is the tail of each list (``LINDEX -1``: Celery pushes on the left and
pops on the right), aged by the ``sent_at`` (or ``first_enqueued_at``) of its guard header.
AMQP: a passive ``queue.declare`` gives the depth (ready messages); the age is not known
without taking the message (a ``basic.get`` put back would be flagged redelivered, which the
guard reads as a lost worker), so it is reported as ``None`` (docs/observability.md).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from kombu.connection import Connection

from celery_guard.core import headers

logger = logging.getLogger(__name__)

#: Separator of Celery's Redis priority sub-queues, and the priorities they may use.
PRIORITY_SEP = "\x06\x16"
PRIORITY_STEPS = range(1, 10)


@dataclass(frozen=True)
class QueueState:
    """What the broker holds for one queue.

    Attributes:
        queue: The queue name.
        depth: Messages waiting (``None`` when the broker could not be read).
        oldest_age: Seconds since the oldest waiting message was published, if known.
    """

    queue: str
    depth: int | None
    oldest_age: float | None


def _sent_at(raw: Any) -> float | None:
    try:
        message = json.loads(raw)
    except (TypeError, ValueError):
        return None
    guard = headers.read(message.get("headers") if isinstance(message, dict) else None)
    for key in ("sent_at", "first_enqueued_at"):
        value = guard.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def _redis(client: Any, queue: str, now: float) -> QueueState:
    names = [queue, *(f"{queue}{PRIORITY_SEP}{step}" for step in PRIORITY_STEPS)]
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.llen(name)
        pipe.lindex(name, -1)
    replies = pipe.execute()
    depth = sum(int(n) for n in replies[0::2])
    stamps = [s for s in (_sent_at(raw) for raw in replies[1::2] if raw is not None) if s]
    oldest = max(0.0, now - min(stamps)) if stamps else None
    return QueueState(queue, depth, oldest)


def _amqp(channel: Any, queue: str) -> QueueState:
    try:
        declared = channel.queue_declare(queue=queue, passive=True)
    except Exception as exc:  # a queue never declared holds nothing
        if "NOT_FOUND" in str(exc) or "404" in str(exc):
            return QueueState(queue, 0, None)
        raise
    return QueueState(queue, int(declared.message_count), None)


def read(broker_url: str, queues: Iterable[str], *, now: float | None = None) -> list[QueueState]:
    """Depth and oldest age of each of ``queues``; a broker that fails gives ``None`` depths."""
    names = list(dict.fromkeys(queues))
    now = time.time() if now is None else now
    try:
        with Connection(broker_url, connect_timeout=3) as conn:  # type: ignore[no-untyped-call]
            if conn.transport.driver_type == "redis":
                client = conn.default_channel.client
                return [_redis(client, queue, now) for queue in names]
            states = []
            for queue in names:
                # A failed passive declare closes the channel: one channel per queue.
                channel = conn.channel()
                try:
                    states.append(_amqp(channel, queue))
                finally:
                    with contextlib.suppress(Exception):
                        channel.close()
            return states
    except Exception:
        logger.warning("celery_guard: could not read queue depths from the broker", exc_info=True)
        return [QueueState(queue, None, None) for queue in names]
