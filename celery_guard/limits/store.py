"""The limits stores' interface and the Redis one: admission and release, one Lua script each.

``CELERY_GUARD_LIMITS_BACKEND`` selects the store (:func:`get_store`): this Redis store, or the
database store of :mod:`celery_guard.limits.dbstore` with the same semantics.

Concurrency is a semaphore of leases: a sorted set per scope whose members are the holders
(one per running body) scored by their lease expiry. A thread of the worker process renews
the leases of the bodies it runs (every third of a lease); a holder releases its slot after
the body, and a holder that never does (its worker was SIGKILLed) drops out when its lease
ends.

Rates are a sliding log: a sorted set per scope of the starts of the last period, scored by
their time. An admission counts the starts in ``(now - period, now]``, so in any window of one
period at most ``count`` bodies start (no burst allowance: the tolerance is zero).

A back-off key per scope (set when a gateway behind a named limit answered 429 with
``Retry-After``) refuses every run of that scope until it expires.

Reservations (``admit(..., reserve=True)``): a hash per scope keeps the next free start of
its rate and of its semaphore. A refused run is handed a start spread behind the runs already
waiting (``period / count`` apart for a rate; the measured gap between releases of a full
semaphore for a concurrency), so its deferral brings it back about once; a run holding no
reservation of a rate queues behind those that do. Every start still passes the sliding
log, so the rate's guarantee does not depend on them.

One script checks every rule of a run and, only if all of them admit it, takes its slots
and records its starts: one round trip to admit, one to release. The script reads the
server's clock, so workers' clocks do not matter.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from django.db import connections as db_connections

from celery_guard.conf import guard_settings, memo
from celery_guard.core import resp
from celery_guard.limits.base import Admission, LimitsStore, Unavailable
from celery_guard.limits.rules import Rule

__all__ = [
    "BACKENDS",
    "Admission",
    "LimitsStore",
    "Store",
    "Unavailable",
    "backend",
    "drop",
    "get_store",
    "hold",
    "redis_store",
    "redis_url",
]

logger = logging.getLogger(__name__)

#: KEYS: per rule, its concurrency set, its rate log, its back-off key and its queue (a hash:
#: ``r``/``c`` the next free reserved start of the rate/concurrency, ``g`` the gap between
#: two releases of a full semaphore, ``l`` the last such release). ARGV: holder, lease (s),
#: rule count, reserve (1: a refused run reserves a future start), then per rule:
#: concurrency (0: none), rate count (0: none), rate period (s), held (1: the run holds a
#: reservation of this rule), default gap (s). Returns {1} when admitted, else {0, rule
#: index, kind, seconds until it may be admitted, 1 when that is a reservation it now holds}.
ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local holder, lease, n = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local reserving = ARGV[4] == '1'
local function arg(i, j) return tonumber(ARGV[4 + 5 * (i - 1) + j]) end
local function reserve(qk, field, earliest, spacing)
  local at = math.max(earliest, tonumber(redis.call('HGET', qk, field) or '0'))
  redis.call('HSET', qk, field, tostring(at + spacing))
  redis.call('PEXPIRE', qk, 3600000)
  return at
end
local function queued(qk, field)
  return reserving and tonumber(redis.call('HGET', qk, field) or '0') > now
end
for i = 1, n do
  local conc, count, period, held, gap0 = arg(i, 1), arg(i, 2), arg(i, 3), arg(i, 4), arg(i, 5)
  local ck, rk, bk, qk = KEYS[4 * i - 3], KEYS[4 * i - 2], KEYS[4 * i - 1], KEYS[4 * i]
  local backoff = redis.call('PTTL', bk)
  if backoff > 0 then
    local free = now + backoff / 1000
    if reserving and count > 0 then
      return {0, i, 'backoff', tostring(reserve(qk, 'r', free, period / count) - now), 1}
    end
    return {0, i, 'backoff', tostring(backoff / 1000), 0}
  end
  if conc > 0 then
    redis.call('ZREMRANGEBYSCORE', ck, '-inf', now)
    if redis.call('ZCARD', ck) >= conc then
      if not reserving then
        local first = redis.call('ZRANGE', ck, 0, 0, 'WITHSCORES')
        return {0, i, 'concurrency', tostring(tonumber(first[2]) - now), 0}
      end
      -- No place in line for a slot (a free one goes to whoever asks first): the refused
      -- run comes back when, at the measured pace of releases, the ones ahead had theirs.
      local gap = tonumber(redis.call('HGET', qk, 'g') or tostring(gap0 / conc))
      return {0, i, 'concurrency', tostring(reserve(qk, 'c', now + gap, gap) - now), 1}
    end
  end
  if count > 0 then
    redis.call('ZREMRANGEBYSCORE', rk, '-inf', now - period)
    local full = redis.call('ZCARD', rk) >= count
    if full or (held == 0 and queued(qk, 'r')) then
      local free = now
      if full then
        local first = redis.call('ZRANGE', rk, 0, 0, 'WITHSCORES')
        free = tonumber(first[2]) + period
      end
      if not reserving then return {0, i, 'rate', tostring(free - now), 0} end
      -- A run back for its reservation that finds the window full (it came late, with the
      -- schedule's batch) takes a new one at the end of the line: waiting for the window
      -- alone would bring it back with the next batch, and those refused would pile up.
      return {0, i, 'rate', tostring(reserve(qk, 'r', free, period / count) - now), 1}
    end
  end
end
for i = 1, n do
  local conc, count, period = arg(i, 1), arg(i, 2), arg(i, 3)
  local ck, rk = KEYS[4 * i - 3], KEYS[4 * i - 2]
  if conc > 0 then
    redis.call('ZADD', ck, now + lease, holder)
    redis.call('PEXPIRE', ck, math.ceil(lease * 1000) + 1000)
  end
  if count > 0 then
    redis.call('ZADD', rk, now, holder)
    redis.call('PEXPIRE', rk, math.ceil(period * 1000) + 1000)
  end
end
return {1}
"""

#: KEYS: per concurrency rule of the run, its set and its queue. ARGV: holder, longest gap
#: (s), then per rule its concurrency. A release from a full semaphore also measures the gap
#: between two such releases (a moving average): how far apart waiting runs are reserved.
RELEASE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local cap = tonumber(ARGV[2])
for i = 1, #KEYS / 2 do
  local ck, qk = KEYS[2 * i - 1], KEYS[2 * i]
  if redis.call('ZSCORE', ck, ARGV[1]) then
    if redis.call('ZCOUNT', ck, now, '+inf') >= tonumber(ARGV[2 + i]) then
      local last = tonumber(redis.call('HGET', qk, 'l') or '0')
      if last > 0 then
        local gap = math.min(now - last, cap)
        local old = tonumber(redis.call('HGET', qk, 'g') or tostring(gap))
        redis.call('HSET', qk, 'g', tostring(0.7 * old + 0.3 * gap))
      end
      redis.call('HSET', qk, 'l', tostring(now))
      redis.call('PEXPIRE', qk, 3600000)
    else
      redis.call('HDEL', qk, 'l')
    end
    redis.call('ZREM', ck, ARGV[1])
  end
end
return 1
"""

#: KEYS: the concurrency sets of a running body's rules. ARGV: holder, lease (s). Extends the
#: holder's live leases (an expired one is not revived: its slot may be someone else's).
RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local lease = tonumber(ARGV[2])
for i = 1, #KEYS do
  local until_ = tonumber(redis.call('ZSCORE', KEYS[i], ARGV[1]) or '0')
  if until_ > now then
    redis.call('ZADD', KEYS[i], now + lease, ARGV[1])
    redis.call('PEXPIRE', KEYS[i], math.ceil(lease * 1000) + 1000)
  end
end
return 1
"""

#: KEYS: back-off keys. ARGV: milliseconds. Lengthens a back-off, never shortens it.
BACK_OFF = """
for i = 1, #KEYS do
  if redis.call('PTTL', KEYS[i]) < tonumber(ARGV[1]) then
    redis.call('SET', KEYS[i], '1', 'PX', ARGV[1])
  end
end
return 1
"""

#: Longest gap between two releases of a full semaphore that the moving average takes in
#: (seconds): a waiting run is reserved at most this far behind the one before it.
MAX_GAP = 30.0

#: Seconds the store is left alone after it could not be reached (no timeout per task).
OUTAGE_PAUSE = 2.0


#: The values of ``CELERY_GUARD_LIMITS_BACKEND`` (``None``: chosen by :func:`backend`).
BACKENDS = ("redis", "database")


def backend() -> str:
    """The store in use: the setting, else ``"redis"`` when there is a Redis for the limits.

    Without a setting, a Redis broker or ``CELERY_GUARD_LIMITS_REDIS_URL`` selects Redis;
    otherwise the database (the embedded default).
    """
    chosen = guard_settings.limits_backend
    if chosen is not None:
        return chosen
    return "redis" if redis_url() is not None else "database"


def redis_url() -> str | None:
    """The limits' Redis: ``CELERY_GUARD_LIMITS_REDIS_URL``, else a Redis broker's URL.

    Kept with the settings (``conf.memo``): every admission asks for it, and Celery's
    ``broker_url`` look-up costs more than the rest of the step's look-ups.
    """
    return memo("limits_redis_url", _redis_url)


def _redis_url() -> str | None:
    url = guard_settings.limits_redis_url
    if url:
        return url
    from celery import current_app

    broker = current_app.conf.broker_url
    if isinstance(broker, str) and broker.split(":", 1)[0] in ("redis", "rediss", "unix"):
        return broker
    return None


#: Clients by process and URL: one connection pool per process. Keyed by pid, like the
#: delivery schedule's, so a forked pool process never shares its parent's connections.
_clients: dict[tuple[int, str], Any] = {}
_paused_until = 0.0


def _client(url: str) -> Any:
    key = (os.getpid(), url)
    client = _clients.get(key)
    if client is None:
        # Short timeouts: an unreachable store costs a task about a second, then nothing
        # for OUTAGE_PAUSE seconds.
        client = _clients[key] = redis.Redis.from_url(
            url, socket_connect_timeout=1.0, socket_timeout=2.0
        )
    return client


class Store:
    """The Redis limits store (one per process and URL, see :func:`get_store`)."""

    #: It can reserve future starts for refused runs (``admit(..., reserve=True)``). A
    #: backend without the attribute is asked plainly and its refused runs are deferred by
    #: the time it gives.
    reserves = True

    def __init__(self, url: str, prefix: str) -> None:
        self.client = _client(url)
        self.prefix = prefix
        self._admit = self.client.register_script(ADMIT)
        self._release = self.client.register_script(RELEASE)
        self._back_off = self.client.register_script(BACK_OFF)
        self._renew = self.client.register_script(RENEW)
        #: Connections the admission keeps between calls: this process's store only
        #: (:func:`get_store` makes one per process), so no fork shares them.
        self._kept = resp.KeptConnections(self.client)

    def keys(self, rule: Rule) -> tuple[str, str, str]:
        """The concurrency set, rate log and back-off key of a rule."""
        return (
            f"{self.prefix}c:{rule.scope}",
            f"{self.prefix}r:{rule.scope}",
            f"{self.prefix}b:{rule.scope}",
        )

    def queue(self, rule: Rule) -> str:
        """The key of a rule's reservations (next free starts, gap between releases)."""
        return f"{self.prefix}q:{rule.scope}"

    def admit(
        self,
        rules: Sequence[Rule],
        lease: float,
        holder: str | None = None,
        *,
        reserve: bool = False,
        held: Collection[str] = (),
    ) -> Admission:
        """Admit one run under ``rules`` (taking its slots and starts) or say why not.

        Args:
            rules: The run's rules, all of which must admit it.
            lease: Seconds a concurrency slot is held unless renewed.
            holder: The holder's name (a fresh one by default).
            reserve: A refused run reserves the next free start of the rule that refused it
                (see :class:`Admission`); runs holding no reservation then wait behind those
                that do. Without it, the rules are checked as they stand.
            held: Scopes of the rules the run holds a reservation of (from earlier refusals).

        Raises:
            Unavailable: Redis cannot be reached.
        """
        holder = holder or f"{os.getpid()}:{uuid.uuid4().hex}"
        keys: list[str] = []
        args: list[Any] = [holder, lease, len(rules), 1 if reserve else 0]
        gap = guard_settings.limits_defer_delay
        for rule in rules:
            keys += [*self.keys(rule), self.queue(rule)]
            args += [
                rule.concurrency or 0,
                rule.rate.count if rule.rate else 0,
                rule.rate.period if rule.rate else 0,
                1 if rule.scope in held else 0,
                gap,
            ]
        answer = _guarded(lambda: self._kept.evalsha(self._admit, keys, args))
        if int(answer[0]) == 1:
            return Admission(True, holder)
        kind = answer[2].decode() if isinstance(answer[2], bytes) else str(answer[2])
        rule = rules[int(answer[1]) - 1]
        return Admission(False, holder, rule, kind, float(answer[3]), int(answer[4]) == 1)

    def release(self, rules: Sequence[Rule], holder: str) -> None:
        """Give back the concurrency slots ``holder`` took.

        Raises:
            Unavailable: Redis cannot be reached (the slots return when their lease ends).
        """
        bound = [rule for rule in rules if rule.concurrency]
        if bound:
            keys = [key for rule in bound for key in (self.keys(rule)[0], self.queue(rule))]
            args = [holder, MAX_GAP, *(rule.concurrency for rule in bound)]
            _guarded(lambda: self._release(keys=keys, args=args))

    def release_unanswered(self, rules: Sequence[Rule], holder: str) -> None:
        """:meth:`release`, sent without waiting for Redis's answer.

        It goes on the connection the next admission of this process takes, so Redis runs
        it before that admission; the answer is read then, or within a quarter of a second
        when the process is idle (``resp.KeptConnections.send``). The release is idempotent,
        so one whose connection was lost is sent again; one that fails is logged.

        Raises:
            Unavailable: Redis cannot be reached (the slots return when their lease ends).
        """
        bound = [rule for rule in rules if rule.concurrency]
        if bound:
            keys = [key for rule in bound for key in (self.keys(rule)[0], self.queue(rule))]
            args = [holder, MAX_GAP, *(rule.concurrency for rule in bound)]
            what = f"the release of the limit slots of {holder}"
            _guarded(lambda: self._kept.send(self._release, keys, args, what))

    def flush(self) -> None:
        """Read the answers of this process's releases sent unanswered."""
        self._kept.flush()

    def renew(self, rules: Sequence[Rule], holder: str, lease: float) -> None:
        """Extend ``holder``'s live concurrency leases by ``lease`` seconds from now.

        Raises:
            Unavailable: Redis cannot be reached.
        """
        keys = [self.keys(rule)[0] for rule in rules if rule.concurrency]
        if keys:
            _guarded(lambda: self._renew(keys=keys, args=[holder, lease]))

    def back_off(self, rules: Sequence[Rule], seconds: float) -> None:
        """Admit no run under ``rules`` for ``seconds`` (a gateway answered 429 Retry-After).

        Raises:
            Unavailable: Redis cannot be reached.
        """
        keys = [self.keys(rule)[2] for rule in rules]
        if keys and seconds > 0:
            _guarded(lambda: self._back_off(keys=keys, args=[max(1, int(seconds * 1000))]))

    def holders(self, rule: Rule) -> int:
        """How many live holders a rule's concurrency set has now (admin, tests).

        After this process's own releases: their answers are read first.
        """
        self.flush()
        return int(self.client.zcount(self.keys(rule)[0], time.time(), "+inf"))

    def ping(self) -> None:
        """One round trip to Redis (``doctor``)."""
        self.client.ping()


def _guarded(call: Any) -> Any:
    global _paused_until
    if time.monotonic() < _paused_until:
        raise Unavailable("the limits store was unreachable moments ago")
    try:
        return call()
    except redis.RedisError as exc:
        _paused_until = time.monotonic() + OUTAGE_PAUSE
        raise Unavailable(str(exc)) from exc


_stores: dict[tuple[int, str, str], Store] = {}


def get_store() -> LimitsStore:
    """This process's store: the one ``CELERY_GUARD_LIMITS_BACKEND`` selects (see :func:`backend`).

    Raises:
        Unavailable: The Redis backend is selected but there is no Redis for the limits (no
            setting and the broker is not Redis).
        ValueError: ``CELERY_GUARD_LIMITS_BACKEND`` is neither ``"redis"`` nor ``"database"``.
    """
    chosen = backend()
    if chosen == "database":
        from celery_guard.limits import dbstore

        return dbstore.get_store()
    if chosen != "redis":
        raise ValueError(
            f"CELERY_GUARD_LIMITS_BACKEND must be 'redis', 'database' or None, got {chosen!r}"
        )
    return redis_store()


def redis_store() -> Store:
    """This process's Redis store for the configured URL and prefix.

    Raises:
        Unavailable: No Redis for the limits (no setting and the broker is not Redis).
    """
    url = redis_url()
    if url is None:
        raise Unavailable(
            "no Redis for the limits: set CELERY_GUARD_LIMITS_REDIS_URL (the broker is not Redis)"
        )
    prefix = guard_settings.limits_redis_prefix
    key = (os.getpid(), url, prefix)
    store = _stores.get(key)
    if store is None:
        store = _stores[key] = Store(url, prefix)
    return store


@dataclass
class _Held:
    store: LimitsStore
    rules: tuple[Rule, ...]
    lease: float
    renewed: float


#: The slots the bodies of this process hold, by holder, renewed by :func:`_background`.
_held: dict[str, _Held] = {}
#: Releases handed to the background thread: a body's end does not wait for the store.
_releases: queue.SimpleQueue[tuple[LimitsStore, tuple[Rule, ...], str]] = queue.SimpleQueue()
#: Releases queued and not yet answered by the store, and the condition they are waited on.
_unsent = 0
_sent = threading.Condition()
_thread_pid: int | None = None
#: Seconds between two looks of the background thread at the held slots.
RENEW_TICK = 0.25
#: Longest wait of an admission for this process's own releases still in flight.
SETTLE_TIMEOUT = 1.0


def _ensure_thread() -> None:
    global _thread_pid, _releases, _unsent, _sent
    if _thread_pid == os.getpid():
        return
    # A forked pool process inherits neither the thread nor a usable copy of its state.
    _thread_pid = os.getpid()
    _releases, _unsent, _sent = queue.SimpleQueue(), 0, threading.Condition()
    threading.Thread(target=_background, name="celery-guard-limits", daemon=True).start()


def hold(limits: LimitsStore, rules: Sequence[Rule], holder: str, lease: float) -> None:
    """Keep ``holder``'s concurrency slots alive while its body runs (until :func:`drop`)."""
    if not any(rule.concurrency for rule in rules):
        return
    _ensure_thread()
    _held[holder] = _Held(limits, tuple(rules), lease, time.monotonic())


def drop(holder: str) -> None:
    """Stop renewing ``holder``'s slots (its body ended)."""
    _held.pop(holder, None)


def release_later(limits: LimitsStore, rules: Sequence[Rule], holder: str) -> None:
    """Stop renewing ``holder``'s slots and release them without waiting for the store.

    The release is one round trip to the store that the task's result does not depend on.
    The Redis store sends it at once and reads the answer later
    (:meth:`Store.release_unanswered`): Redis runs it before anything this process sends
    next. Another store's release is handed to the background thread, so it overlaps with
    whatever the process does next; until it is answered the slots still count as taken (a
    limit is only ever stricter for it), and :func:`settle` makes the next admission of this
    process wait for it. A process that dies first leaves its slots to run out with their
    lease, as a SIGKILLed one does.
    """
    global _unsent
    drop(holder)
    if not any(rule.concurrency for rule in rules):
        return
    _ensure_thread()
    if isinstance(limits, Store):
        try:
            limits.release_unanswered(rules, holder)
        except Exception:
            _could_not_release(holder)
        return
    with _sent:
        _unsent += 1
    _releases.put((limits, tuple(rules), holder))


def settle(timeout: float = SETTLE_TIMEOUT) -> None:
    """Wait until this process's queued releases reached the store (or ``timeout``)."""
    if not _unsent:
        return
    with _sent:
        _sent.wait_for(lambda: not _unsent, timeout)


def _release(limits: LimitsStore, rules: tuple[Rule, ...], holder: str) -> None:
    global _unsent
    try:
        limits.release(rules, holder)
    except Exception:
        _could_not_release(holder)
    finally:
        with _sent:
            _unsent -= 1
            _sent.notify_all()


def _could_not_release(holder: str) -> None:
    logger.warning(
        "celery_guard: could not release the limit slots of %s; they return when their lease ends",
        holder,
        exc_info=True,
    )


def _background() -> None:
    releases = _releases
    while True:
        try:
            _release(*releases.get(timeout=RENEW_TICK))
        except queue.Empty:
            if not _held:
                # Idle (no release sent, no body holds a slot): the database store's
                # connection of this thread (if any) is not kept open.
                _close_thread_connections()
                continue
        now = time.monotonic()
        for holder, held in list(_held.items()):
            if now - held.renewed < held.lease / 3:
                continue
            try:
                held.store.renew(held.rules, holder, held.lease)
                held.renewed = now
            except Exception:
                logger.warning(
                    "celery_guard: could not renew the limit slots of %s", holder, exc_info=True
                )


def _close_thread_connections() -> None:
    for connection in db_connections.all(initialized_only=True):
        if connection.connection is not None:
            connection.close()
