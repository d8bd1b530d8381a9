"""The schedule: delayed messages held outside the queue until due, then moved to its front.

Two backends:

* :class:`RedisSchedule` (the broker is Redis): the finished broker message (exactly what
  kombu's Redis transport would push) is kept in a sorted set scored by its due time. One
  Lua script renews the poller's lease and moves the due messages onto the *consuming end*
  of their list (``RPUSH``; workers ``BRPOP``), so a due message is the next one taken,
  ahead of the backlog. The script runs atomically: a message is in the sorted set or in the
  queue, never both and never neither, whatever happens to the poller.
* :class:`DatabaseSchedule` (any other broker): an :class:`OutboxMessage` row with a future
  ``due_at``, published by the poller through Celery when due (see ``services``).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from collections.abc import Callable
from typing import Any, cast

import redis
from kombu.entity import Exchange, Queue
from kombu.utils import json as kombu_json

from celery_guard.conf import guard_settings

#: Renew (or take) the lease, then move due messages onto the front of their queues.
#: KEYS: lease, schedule. ARGV: holder, lease ms, now, batch. Returns -1 when another
#: poller holds the lease, else the number of messages moved.
MOVE_DUE = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return -1 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[3], 'LIMIT', 0, ARGV[4])
for i = #due, 1, -1 do
  local item = cjson.decode(due[i])
  redis.call('RPUSH', item['k'], item['m'])
  redis.call('ZREM', KEYS[2], due[i])
end
return #due
"""

#: Give the lease up if this poller still holds it. KEYS: lease. ARGV: holder.
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def backend_name(app: Any) -> str | None:
    """The schedule backend in use with ``app``'s broker: ``"redis"``, ``"database"``, ``None``."""
    name = guard_settings.schedule
    if name != "auto":
        return name
    return "redis" if is_redis(app) else "database"


def is_redis(app: Any) -> bool:
    """Whether ``app``'s broker is Redis."""
    url = str(app.conf.broker_url or "")
    return url.startswith(("redis://", "rediss://", "unix://"))


def is_amqp(app: Any) -> bool:
    """Whether ``app``'s broker is RabbitMQ (or another AMQP 0-9-1 broker)."""
    url = str(app.conf.broker_url or "")
    return url.startswith(("amqp://", "amqps://", "pyamqp://"))


#: The due queue of queue ``<name>`` on AMQP brokers: ``<name>`` + this suffix.
DUE_QUEUE_SUFFIX = ".cg-due"


def due_queue(name: str) -> Queue:
    """The due queue of queue ``name``: where the database schedule publishes its due messages.

    Every worker with celery_guard consumes the due queue of each queue it consumes
    (``bootstep.DueQueues``), through its own consumer and prefetch window: a due message is
    delivered at once instead of behind the backlog of ``name``.
    """
    due = f"{name}{DUE_QUEUE_SUFFIX}"
    exchange = Exchange(due, type="direct")  # type: ignore[no-untyped-call]
    return Queue(due, exchange, routing_key=due, durable=True)  # type: ignore[no-untyped-call]


class DueQueues:
    """Redirects due messages to the due queue of their queue, when a worker consumes it.

    One instance per poll: whether a due queue has consumers is asked of the broker once per
    queue (a passive declare). A due queue nobody consumes (workers without celery_guard,
    an older version) is never published to: the message goes to its own queue, as before.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self._consumed: dict[str, bool] = {}

    def redirect(
        self, task_name: str, args: Any, kwargs: Any, options: dict[str, Any]
    ) -> dict[str, Any]:
        """Return ``options`` sending the message to its due queue, if that one is consumed."""
        name = self._queue_name(task_name, args, kwargs, options)
        if name is None or name.endswith(DUE_QUEUE_SUFFIX) or not self._is_consumed(name):
            return options
        out = {k: v for k, v in options.items() if k not in ("exchange", "routing_key")}
        out["queue"] = due_queue(name)
        return out

    def _queue_name(
        self, task_name: str, args: Any, kwargs: Any, options: dict[str, Any]
    ) -> str | None:
        queue = options.get("queue")
        if isinstance(queue, Queue):
            return str(queue.name)
        if queue:
            return str(queue)
        exchange, routing_key = options.get("exchange"), options.get("routing_key")
        if routing_key and exchange in (None, "", routing_key):
            return str(routing_key)  # a retry: the queue it was delivered from
        routed = self.app.amqp.router.route(dict(options), task_name, args, kwargs)
        found = routed.get("queue")
        return str(found.name) if isinstance(found, Queue) else None

    def _is_consumed(self, name: str) -> bool:
        if name not in self._consumed:
            self._consumed[name] = consumer_count(self.app, due_queue(name).name) > 0
        return self._consumed[name]


def consumer_count(app: Any, queue: str) -> int:
    """How many consumers ``queue`` has on the AMQP broker (0 when it does not exist)."""
    with app.pool.acquire(block=True) as connection:
        channel = connection.channel()
        try:
            _, _, consumers = channel.queue_declare(queue=queue, passive=True)
        except connection.channel_errors:
            return 0  # not declared: the broker closed the channel
        finally:
            # Already closed by the broker after a failed passive declare.
            with contextlib.suppress(Exception):
                channel.close()
        return int(consumers)


#: kombu's JSON encoder (the Redis transport's own), typed.
_dumps = cast(Callable[[Any], str], kombu_json.dumps)


class _Capture:
    """A kombu channel stand-in that records what a publish would push instead of pushing it.

    Delegates everything (declarations included) to the real Redis channel. Its
    ``basic_publish`` does what kombu's virtual transport does before the Redis ``LPUSH``
    (``Channel.basic_publish`` and ``_put``), through the channel's public members only:
    encode the body, stamp the delivery tag and info, find the queues bound to the exchange
    (``typeof(exchange).lookup(get_table(exchange), ...)``) and the list of the message's
    priority (``priority()`` and ``sep``). What stays kombu's implementation rather than its
    API is the message format and the list naming themselves: kombu has no public call that
    returns "the bytes the Redis transport would push, and where", so
    ``tests/integration/test_delivery_schedule.py`` compares a held message with one kombu
    really pushed, for every supported kombu version the suite runs on.
    """

    def __init__(self, channel: Any) -> None:
        self._channel = channel
        self.captured: list[tuple[str, str]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._channel, name)

    def basic_publish(self, message: Any, exchange: str, routing_key: str, **kw: Any) -> None:
        channel = self._channel
        message["body"], encoding = channel.encode_body(message["body"], channel.body_encoding)
        properties = message["properties"]
        properties.update(body_encoding=encoding, delivery_tag=str(uuid.uuid4()))
        properties["delivery_info"].update(exchange=exchange, routing_key=routing_key)
        queues = [routing_key]
        if exchange:
            try:
                table = channel.get_table(exchange)
                queues = channel.typeof(exchange).lookup(table, exchange, routing_key, None)
            except KeyError:
                queues = []
        suffix = _priority_suffix(channel, properties.get("priority"))
        self.captured += [(f"{queue}{suffix}", _dumps(message)) for queue in queues]


def _priority_suffix(channel: Any, priority: Any) -> str:
    """The list suffix kombu's Redis transport gives a message of ``priority``."""
    try:
        value = max(min(int(priority), channel.max_priority), channel.min_priority)
    except (TypeError, ValueError):
        value = channel.default_priority
    step = channel.priority(value)
    return f"{channel.sep}{step}" if step else ""


#: Redis clients by process and broker URL: one connection pool per process, not one per
#: message. Keyed by pid: a pool process forked while the worker's poller thread held the
#: parent client's locks must not inherit that client (it would wait on them forever).
_clients: dict[tuple[int, str], Any] = {}


def _client(url: str) -> Any:
    key = (os.getpid(), url)
    client = _clients.get(key)
    if client is None:
        client = _clients[key] = redis.Redis.from_url(url)
    return client


class RedisSchedule:
    """The schedule in a Redis sorted set next to the broker's queues."""

    name = "redis"

    def __init__(self, app: Any) -> None:
        self.app = app
        prefix = guard_settings.schedule_redis_prefix
        self.key = f"{prefix}due"
        self.lease_key = f"{prefix}lease"
        self.client: Any = _client(str(app.conf.broker_url))
        self._move = self.client.register_script(MOVE_DUE)
        self._release = self.client.register_script(RELEASE)

    def hold(self, due: float, publish: Any) -> None:
        """Keep the message ``publish(producer)`` would send until ``due`` (epoch seconds)."""
        with self.app.producer_or_acquire() as real:
            capture = _Capture(real.channel)
            producer = self.app.amqp.Producer(capture, auto_declare=False)
            publish(producer)
        if not capture.captured:
            raise RuntimeError("the publish produced no broker message to schedule")
        members = {json.dumps({"k": key, "m": body}): due for key, body in capture.captured}
        self.client.zadd(self.key, members)

    def move_due(self, holder: str, batch: int) -> int:
        """Take or renew the lease and move due messages to their queues (-1: not the leader)."""
        lease_ms = int(guard_settings.delivery_lease * 1000)
        return int(
            self._move(keys=[self.lease_key, self.key], args=[holder, lease_ms, time.time(), batch])
        )

    def release(self, holder: str) -> None:
        """Give the lease up (a stopping poller)."""
        self._release(keys=[self.lease_key], args=[holder])

    def holder(self) -> str | None:
        """Who holds the lease now, if anyone (the doctor's question)."""
        value = self.client.get(self.lease_key)
        return value.decode() if value else None

    def entries(self, limit: int = 200) -> list[dict[str, Any]]:
        """The next ``limit`` scheduled messages: due time, queue key, task, id, attempt."""
        found = []
        for member, score in self.client.zrange(self.key, 0, limit - 1, withscores=True):
            item = json.loads(member)
            message = json.loads(item["m"])
            message_headers = message.get("headers") or {}
            found.append(
                {
                    "due": score,
                    "queue": item["k"],
                    "task": message_headers.get("task", ""),
                    "task_id": message_headers.get("id", ""),
                    "attempt": message_headers.get("retries", 0),
                }
            )
        return found

    def size(self) -> int:
        """How many messages wait in the schedule."""
        return int(self.client.zcard(self.key))
