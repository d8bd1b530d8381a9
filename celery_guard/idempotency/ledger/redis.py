"""The Redis idempotency ledger: one hash per key, every transition one Lua script."""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Sequence
from typing import Any

from redis import exceptions as redis_errors

from celery_guard.conf import guard_settings
from celery_guard.core import resp
from celery_guard.idempotency.ledger.base import (
    Claim,
    Ledger,
    NewClaim,
    Start,
    publish_grace,
    start_bound,
)
from celery_guard.idempotency.models import KeyState

# Shared by the scripts: the server's clock (one clock for every producer and worker), and
# a TTL that outlives the window and the lease by the retention, so Redis purges itself.
_LUA_PRELUDE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function touch(retention)
  local h = redis.call('HMGET', KEYS[1], 'expires_at', 'lease_until')
  local last = math.max(tonumber(h[1]) or now, tonumber(h[2]) or now)
  redis.call('PEXPIRE', KEYS[1], math.ceil((last - now + retention) * 1000) + 1000)
end
"""

_LUA_CLAIM = (
    _LUA_PRELUDE
    + """
local task_name, task_id, fp = ARGV[1], ARGV[2], ARGV[3]
local window, retention, grace = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local h = redis.call('HMGET', KEYS[1], 'state', 'task_id', 'fp', 'expires_at', 'lease_until',
  'owner', 'start_by')
local state = h[1]
local function write(abandoned, never_started)
  redis.call('HSET', KEYS[1], 'state', 'pending', 'task_name', task_name, 'task_id', task_id,
    'fp', fp, 'owner', '', 'lease_until', now + grace, 'start_by', 0, 'created_at', now,
    'updated_at', now, 'expires_at', now + window)
  redis.call('HSETNX', KEYS[1], 'token', 0)
  touch(retention)
  -- A fresh claim (the hot path) answers 1: the rest the caller knows, and one integer
  -- costs the client a fraction of parsing five strings.
  if abandoned == '' and never_started == '' then return 1 end
  return {'claimed', task_id, fp, abandoned, never_started}
end
if not state then return write('', '') end
if h[2] == task_id then return {'claimed', task_id, h[3], '', ''} end
local live_run = state == 'running' and tonumber(h[5]) > now
if state == 'released' or (tonumber(h[4]) <= now and not live_run) then return write('', '') end
local deadline, start_by = tonumber(h[5]) or 0, tonumber(h[7]) or 0
if state == 'pending' and h[6] == '' then
  -- Abandoned: unconfirmed past its publish deadline, or confirmed and never started.
  if deadline > 0 and deadline <= now then return write(h[2], '') end
  if deadline <= 0 and start_by > 0 and start_by <= now then return write(h[2], '1') end
end
if h[3] == fp then return {'duplicate', h[2], h[3], '', ''} end
return {'conflict', h[2], h[3], '', ''}
"""
)

_LUA_CONFIRM = (
    _LUA_PRELUDE
    + """
local h = redis.call('HMGET', KEYS[1], 'state', 'task_id', 'owner', 'lease_until')
if h[1] ~= 'pending' or h[2] ~= ARGV[1] or h[3] ~= '' then return 0 end
if (tonumber(h[4]) or 0) <= 0 then return 0 end
redis.call('HSET', KEYS[1], 'lease_until', 0, 'start_by', now + tonumber(ARGV[2]),
  'updated_at', now)
return 1
"""
)

_LUA_START = (
    _LUA_PRELUDE
    + """
local task_name, task_id, fp = ARGV[1], ARGV[2], ARGV[3]
local window, retention = tonumber(ARGV[4]), tonumber(ARGV[5])
local owner, lease = ARGV[6], tonumber(ARGV[7])
local h = redis.call('HMGET', KEYS[1], 'state', 'task_id', 'expires_at', 'lease_until', 'token')
local state = h[1]
local takeable = (not state) or state == 'pending' or state == 'failed'
  or state == 'released' or (state == 'running' and tonumber(h[4]) <= now)
  or (state == 'succeeded' and tonumber(h[3]) <= now)
  or (ARGV[8] == '1' and state == 'running' and h[2] == task_id)
if takeable then
  local expires = now + window
  if state and tonumber(h[3]) > now then expires = tonumber(h[3]) end
  local token = redis.call('HINCRBY', KEYS[1], 'token', 1)
  redis.call('HSET', KEYS[1], 'state', 'running', 'task_name', task_name, 'task_id', task_id,
    'fp', fp, 'owner', owner, 'lease_until', now + lease, 'start_by', 0, 'updated_at', now,
    'expires_at', expires)
  redis.call('HSETNX', KEYS[1], 'created_at', now)
  touch(retention)
  return {'run', token, '0', task_id}
end
if state == 'succeeded' then return {'skip', tonumber(h[5]), '0', h[2]} end
return {'busy', tonumber(h[5]), tostring(tonumber(h[4]) - now), h[2]}
"""
)

_LUA_TRANSITION = (
    _LUA_PRELUDE
    + """
local h = redis.call('HMGET', KEYS[1], 'state', 'owner', 'token')
local held = h[1] == 'running' or (ARGV[3] == 'failed' and h[1] == 'pending')
if not held or h[2] ~= ARGV[1] or h[3] ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[3], 'updated_at', now)
return 1
"""
)

_LUA_RENEW = (
    _LUA_PRELUDE
    + """
local h = redis.call('HMGET', KEYS[1], 'state', 'owner', 'token', 'lease_until')
if h[1] ~= 'running' or h[2] ~= ARGV[1] or h[3] ~= ARGV[2] then return 0 end
if tonumber(h[4]) <= now then return 0 end
redis.call('HSET', KEYS[1], 'lease_until', now + tonumber(ARGV[3]), 'updated_at', now)
touch(tonumber(ARGV[4]))
return 1
"""
)

_LUA_RELEASE = (
    _LUA_PRELUDE
    + """
local h = redis.call('HMGET', KEYS[1], 'state', 'task_id')
if not h[1] or h[1] == 'released' then return 0 end
if ARGV[1] ~= '' and h[2] ~= ARGV[1] then return 0 end
if ARGV[2] ~= '' and h[1] ~= ARGV[2] then return 0 end
if ARGV[3] == '1' and h[1] == 'succeeded' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'released', 'updated_at', now)
return 1
"""
)


_SKIP_REPLY = resp.pack(("CLIENT", "REPLY", "SKIP"))
_PROBE = b"celery_guard:reply-skip"


#: The confirm script's ``EVAL <script> 1``, for :meth:`RedisLedger._send_quietly`: a quiet
#: confirm sends the whole script on every publish (see :meth:`RedisLedger.confirm`), so
#: encoding and framing its text once saves most of it.
_CONFIRM_EVAL = resp.head("EVAL", _LUA_CONFIRM, 1)


@functools.lru_cache(maxsize=8)
def _redis_client(url: str) -> Any:
    import redis

    # redis-py's pool notices a fork and reconnects, so one client per process is safe.
    return redis.Redis.from_url(url)


class RedisLedger(Ledger):
    """Ledger in Redis: one hash per key, every transition one Lua script.

    Records expire by themselves (TTL: window or lease, plus the retention), so
    :meth:`purge` has nothing to do.
    """

    def __init__(self, url: str, prefix: str) -> None:
        self.url = url
        self.prefix = prefix
        self.client = _redis_client(url)
        self._claim = self.client.register_script(_LUA_CLAIM)
        self._confirm = self.client.register_script(_LUA_CONFIRM)
        self._start = self.client.register_script(_LUA_START)
        self._transition = self.client.register_script(_LUA_TRANSITION)
        self._release = self.client.register_script(_LUA_RELEASE)
        self._renew = self.client.register_script(_LUA_RENEW)
        #: Whether the server skips a reply on request (probed on first use).
        self._skips_replies: bool | None = None
        #: Connections the hot path took from the pool and keeps between calls (see
        #: :meth:`_take`); a forked child starts without its parent's.
        self._kept = resp.KeptConnections(self.client)

    def _key(self, key: str) -> str:
        return self.prefix + key

    @staticmethod
    def _retention() -> float:
        return guard_settings.idempotency_retention

    def claim(
        self,
        key: str,
        *,
        task_name: str,
        task_id: str,
        fingerprint: str,
        window: float,
        grace: float | None = None,
    ) -> Claim:
        """See :meth:`Ledger.claim`."""
        args = [task_name, task_id, fingerprint, window, self._retention(), publish_grace(grace)]
        reply = self._run(self._claim, self._key(key), args)
        return _claim_of(reply, task_id, fingerprint)

    def claim_many(
        self, claims: Sequence[NewClaim], *, task_name: str, grace: float | None = None
    ) -> list[Claim]:
        """See :meth:`Ledger.claim_many`: the claim script of every key, one pipeline."""
        retention, grace = self._retention(), publish_grace(grace)
        pipe = self.client.pipeline(transaction=False)
        for c in claims:
            args = [task_name, c.task_id, c.fingerprint, c.window, retention, grace]
            self._claim(keys=[self._key(c.key)], args=args, client=pipe)
        return [
            _claim_of(reply, c.task_id, c.fingerprint)
            for c, reply in zip(claims, pipe.execute(), strict=True)
        ]

    def confirm(
        self, key: str, task_id: str, start_within: float | None = None, *, wait: bool = True
    ) -> bool:
        """See :meth:`Ledger.confirm`.

        With ``wait=False`` the script is sent behind ``CLIENT REPLY SKIP`` and its answer
        is not awaited: the enqueue saves a round trip. Redis runs a connection's commands in
        order, so any later command of this process on that connection (the pool hands the
        same one back first) sees the confirmation. A server that cannot skip a reply (an
        old one, a proxy, a renamed ``CLIENT``) gets the usual call.
        """
        args = [task_id, start_bound(start_within)]
        if not wait and self._send_quietly(_CONFIRM_EVAL, self._key(key), args):
            return True
        return bool(self._confirm(keys=[self._key(key)], args=args))

    def _run(self, script: Any, key: str, args: Sequence[Any]) -> Any:
        """Run a registered ``script`` on ``key``: the hot path's one round trip.

        ``EVALSHA`` straight on a connection this ledger keeps (``resp.KeptConnections``),
        which costs half the CPU of redis-py's ``Script`` call.
        """
        return self._kept.evalsha(script, (key,), args)

    def _take(self) -> Any:
        """A kept connection for one command and its reply; give it back with :meth:`_give`.

        A confirmation sent without waiting (:meth:`_send_quietly`) stays on the pool, so a
        read through the client (:meth:`get`) still follows it on the same connection; the
        scripts sent on kept connections decide the same whether or not it was applied yet
        (a pending claim answers a claim or a start alike, confirmed or not).
        """
        return self._kept.take()

    def _give(self, conn: Any) -> None:
        self._kept.give(conn)

    def _send_quietly(self, head: bytes, key: str, args: Sequence[Any]) -> bool:
        """Send a script (``head``: ``resp.head`` of it) on ``key`` with no reply to wait for.

        Returns False when it cannot.
        """
        if self._skips_replies is None:
            self._skips_replies = self._probe_reply_skip()
        if not self._skips_replies:
            return False
        pool = self.client.connection_pool
        # A pooled connection, not one the hot path keeps (:meth:`_take`): the pool hands it
        # back first to the next command of this thread, which thus runs after the confirmation.
        conn = resp.connection(pool)
        try:
            # EVAL, not EVALSHA: a NOSCRIPT error would go unseen with its reply skipped.
            command = b"*%d\r\n%s%s" % (4 + len(args), head, resp.bulk((key, *args)))
            conn.send_packed_command([_SKIP_REPLY + command])
        except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError):
            conn.disconnect()
            return False  # a stale pooled connection: the usual call reconnects and retries
        except BaseException:
            conn.disconnect()
            raise
        finally:
            pool.release(conn)
        return True

    def _probe_reply_skip(self) -> bool:
        """Whether the server honours ``CLIENT REPLY SKIP`` (asked once per ledger)."""
        pool = self.client.connection_pool
        conn = resp.connection(pool)
        skipped = False
        try:
            conn.send_packed_command(
                [_SKIP_REPLY + resp.pack(("PING",)) + resp.pack(("ECHO", _PROBE))]
            )
            # PING's reply skipped: the first reply is ECHO's. An error (CLIENT refused)
            # or anything else leaves replies unread: the connection is dropped below.
            skipped = conn.read_response() == _PROBE
        except Exception:
            skipped = False
        finally:
            if not skipped:
                conn.disconnect()
            pool.release(conn)
        return skipped

    def confirm_many(
        self, published: Sequence[tuple[str, str]], start_within: float | None = None
    ) -> int:
        """See :meth:`Ledger.confirm_many`: the confirm script of every key, one pipeline."""
        within = start_bound(start_within)
        pipe = self.client.pipeline(transaction=False)
        for key, task_id in published:
            self._confirm(keys=[self._key(key)], args=[task_id, within], client=pipe)
        return sum(bool(reply) for reply in pipe.execute())

    def unclaim(self, key: str, task_id: str) -> bool:
        """See :meth:`Ledger.unclaim`."""
        return bool(self._release(keys=[self._key(key)], args=[task_id, KeyState.PENDING, "0"]))

    def start(
        self,
        key: str,
        *,
        task_name: str,
        task_id: str,
        fingerprint: str,
        window: float,
        owner: str,
        lease: float,
        reclaim: bool = False,
    ) -> Start:
        """See :meth:`Ledger.start`."""
        args = [task_name, task_id, fingerprint, window, self._retention(), owner, lease]
        args.append("1" if reclaim else "0")
        outcome, token, wait, holder = self._run(self._start, self._key(key), args)
        return Start(outcome.decode(), int(token), float(wait), holder.decode())

    def finish(self, key: str, *, owner: str, token: int, state: str) -> bool:
        """See :meth:`Ledger.finish`."""
        if state not in (KeyState.SUCCEEDED, KeyState.FAILED):
            raise ValueError(f"a run finishes as succeeded or failed, not {state!r}")
        return bool(self._run(self._transition, self._key(key), [owner, token, state]))

    def yield_lease(self, key: str, *, owner: str, token: int) -> bool:
        """See :meth:`Ledger.yield_lease`."""
        return bool(self._transition(keys=[self._key(key)], args=[owner, token, KeyState.PENDING]))

    def renew(self, key: str, *, owner: str, token: int, lease: float) -> bool:
        """See :meth:`Ledger.renew`."""
        args = [owner, token, lease, self._retention()]
        return bool(self._renew(keys=[self._key(key)], args=args))

    def release(
        self, key: str, task_id: str | None = None, *, keep_succeeded: bool = False
    ) -> bool:
        """See :meth:`Ledger.release`."""
        args = [task_id or "", "", "1" if keep_succeeded else "0"]
        return bool(self._release(keys=[self._key(key)], args=args))

    def get(self, key: str) -> dict[str, Any] | None:
        """See :meth:`Ledger.get`."""
        return _record_of(key, self.client.hgetall(self._key(key)))

    def get_many(self, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        """See :meth:`Ledger.get_many`: one pipeline."""
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.hgetall(self._key(key))
        records = {key: _record_of(key, raw) for key, raw in zip(keys, pipe.execute(), strict=True)}
        return {key: record for key, record in records.items() if record is not None}

    def purge(self, retention: float) -> int:
        """See :meth:`Ledger.purge` (Redis expires the records itself)."""
        return 0


def _record_of(key: str, raw: dict[bytes, bytes]) -> dict[str, Any] | None:
    """A record as :meth:`Ledger.get` returns it, from the hash of ``key`` (or None)."""
    if not raw:
        return None
    row = {k.decode(): v.decode() for k, v in raw.items()}
    return {
        "key": key,
        "state": row["state"],
        "task_name": row.get("task_name", ""),
        "task_id": row.get("task_id", ""),
        "fingerprint": row.get("fp", ""),
        "fencing_token": int(row.get("token", 0)),
        "owner": row.get("owner", ""),
        "lease_expires_at": _stamp(row.get("lease_until")),
        "start_by": _stamp(row.get("start_by")),
        "created_at": _stamp(row.get("created_at")),
        "updated_at": _stamp(row.get("updated_at")),
        "expires_at": _stamp(row.get("expires_at")),
    }


def _claim_of(reply: int | Sequence[bytes], task_id: str, fingerprint: str) -> Claim:
    """The claim script's answer for the call of ``task_id`` with ``fingerprint``."""
    if reply == 1:
        return Claim("claimed", task_id, fingerprint)
    assert not isinstance(reply, int)
    outcome, holder, fp, abandoned, unstarted = reply
    return Claim(
        outcome.decode(), holder.decode(), fp.decode(), abandoned.decode(), bool(unstarted)
    )


def _stamp(value: str | None) -> dt.datetime | None:
    if not value or float(value) == 0:
        return None
    return dt.datetime.fromtimestamp(float(value), tz=dt.timezone.utc)
