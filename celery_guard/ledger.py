"""Idempotency ledger backends: the database (default) and Redis, with the same semantics.

Every state change is one atomic step on the store (an insert guarded by the unique key, a
conditional ``UPDATE ... WHERE``, or a Lua script), never a read followed by a write, so
producers and workers racing on one key from many processes each get a consistent answer.

States of a key: ``pending`` (claimed at enqueue, published), ``running`` (a worker holds
the lease), ``succeeded``, ``failed``, ``released`` (free again).

A claim is *provisional* until its publish is confirmed: a ``pending`` record with no owner
and a lease expiry is a claim whose producer has not confirmed the publish yet, and the
lease expiry is its publish deadline. :meth:`Ledger.confirm` clears the deadline after the
publish; a claim still unconfirmed past its deadline was abandoned (the producer died
between the claim and the publish) and the next claim takes the key over, so a crashed
producer never loses the job. (A ``pending`` record *with* an owner is a run that gave its
lease back for a Celery retry; it is never taken over by a claim.)
"""

from __future__ import annotations

import abc
import datetime as dt
import functools
from dataclasses import dataclass
from typing import Any

from django.db import IntegrityError, router, transaction
from django.db.models import Case, F, Q, Value, When
from django.utils import timezone

from celery_guard.conf import guard_settings

PENDING = "pending"
RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
RELEASED = "released"


@dataclass(frozen=True)
class Claim:
    """Outcome of an enqueue-time claim.

    Attributes:
        outcome: ``"claimed"`` (publish), ``"duplicate"`` (same arguments, publish nothing)
            or ``"conflict"`` (other arguments hold the key).
        task_id: The task that holds the key (the caller's own id when claimed).
        fingerprint: The fingerprint of the arguments that hold the key.
        abandoned: When claimed by taking over an abandoned claim (unconfirmed past its
            publish deadline), the task id of that claim; else ``""``.
    """

    outcome: str
    task_id: str
    fingerprint: str
    abandoned: str = ""


@dataclass(frozen=True)
class Start:
    """Outcome of a worker's attempt to start a run of a key.

    Attributes:
        outcome: ``"run"`` (the caller owns the lease), ``"skip"`` (already succeeded) or
            ``"busy"`` (another live owner holds the lease).
        fencing_token: The caller's token when ``run``, else the current token.
        retry_in: Seconds until the other owner's lease expires (``busy`` only).
        task_id: The task that holds the key.
    """

    outcome: str
    fencing_token: int
    retry_in: float = 0.0
    task_id: str = ""


class Ledger(abc.ABC):
    """Storage of idempotency keys; see the module docstring for the states."""

    @abc.abstractmethod
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
        """Claim ``key`` for a publish of ``task_id``, unless a live claim holds it.

        The claim is provisional: unless :meth:`confirm` is called within ``grace`` seconds
        (default ``CELERY_GUARD_IDEMPOTENCY_PUBLISH_GRACE``), a later claim takes it over.
        A key is free when absent, released, past its window (and not running under a live
        lease), or claimed but unconfirmed past its publish deadline (abandoned). A key
        already held by ``task_id`` itself counts as claimed.
        """

    @abc.abstractmethod
    def confirm(self, key: str, task_id: str) -> bool:
        """Confirm the publish of ``task_id``'s claim: clear its publish deadline.

        Only an unconfirmed ``pending`` claim of ``task_id`` changes; ``False`` when the key
        was taken over, or a worker already started the task (its state stands).
        """

    @abc.abstractmethod
    def unclaim(self, key: str, task_id: str) -> bool:
        """Release a ``pending`` claim of ``task_id`` whose publish failed."""

    @abc.abstractmethod
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
    ) -> Start:
        """Take the lease of ``key`` for a run, incrementing its fencing token.

        Taken when the key is absent, pending, failed, released, running under an expired
        lease (a takeover), or succeeded but past its window.
        """

    @abc.abstractmethod
    def finish(self, key: str, *, owner: str, token: int, state: str) -> bool:
        """Move a run ``owner`` still holds (with ``token``) to ``succeeded`` or ``failed``.

        ``failed`` is also accepted after the run gave its lease back (a retry whose
        publish failed), while no next attempt has taken it.
        """

    @abc.abstractmethod
    def yield_lease(self, key: str, *, owner: str, token: int) -> bool:
        """Give the lease back (state ``pending``) so the next attempt of a retry can run."""

    @abc.abstractmethod
    def renew(self, key: str, *, owner: str, token: int, lease: float) -> bool:
        """Extend a running ``owner``'s lease to ``lease`` seconds from now."""

    @abc.abstractmethod
    def release(self, key: str, task_id: str | None = None) -> bool:
        """Free ``key`` (only while ``task_id`` holds it, when given)."""

    @abc.abstractmethod
    def get(self, key: str) -> dict[str, Any] | None:
        """Return the record of ``key`` as a dict, or ``None``."""

    @abc.abstractmethod
    def purge(self, retention: float) -> int:
        """Delete records whose window ended more than ``retention`` seconds ago."""


def _grace(grace: float | None) -> float:
    return guard_settings.idempotency_publish_grace if grace is None else grace


def _unconfirmed() -> Q:
    """Records that are claims whose publish is not confirmed yet (see the module doc)."""
    return Q(state=PENDING, owner="", lease_expires_at__isnull=False)


def _abandoned(state: str, owner: str, deadline: dt.datetime | None, now: dt.datetime) -> bool:
    return state == PENDING and owner == "" and deadline is not None and deadline <= now


class DatabaseLedger(Ledger):
    """Ledger in the Django database (:class:`celery_guard.models.IdempotencyRecord`).

    Works on PostgreSQL and SQLite: an insert relies on the unique key, and every other
    transition is a single conditional ``UPDATE`` whose ``WHERE`` is the precondition.
    """

    @staticmethod
    def _model() -> Any:
        from celery_guard.models import IdempotencyRecord

        return IdempotencyRecord

    def using(self) -> str:
        """Database alias the ledger writes to."""
        return str(router.db_for_write(self._model()))

    def _insert(self, **fields: Any) -> bool:
        try:
            with transaction.atomic(using=self.using()):
                self._model().objects.using(self.using()).create(**fields)
        except IntegrityError:
            return False
        return True

    def _rows(self) -> Any:
        return self._model().objects.using(self.using())

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
        grace = _grace(grace)
        for _ in range(10):
            now = timezone.now()
            fields = {
                "state": PENDING,
                "task_name": task_name,
                "task_id": task_id,
                "fingerprint": fingerprint,
                "owner": "",
                "lease_expires_at": now + dt.timedelta(seconds=grace),
                "created_at": now,
                "updated_at": now,
                "expires_at": now + dt.timedelta(seconds=window),
            }
            if self._insert(key=key, **fields):
                return Claim("claimed", task_id, fingerprint)
            live_run = Q(state=RUNNING, lease_expires_at__gt=now)
            free = Q(state=RELEASED) | (Q(expires_at__lte=now) & ~live_run)
            if self._rows().filter(free, key=key).update(**fields):
                return Claim("claimed", task_id, fingerprint)
            row = (
                self._rows()
                .filter(key=key)
                .values("task_id", "fingerprint", "state", "owner", "lease_expires_at")
                .first()
            )
            if row is None:  # purged between the two statements: try again
                continue
            if row["task_id"] == task_id:
                return Claim("claimed", task_id, row["fingerprint"])
            if _abandoned(row["state"], row["owner"], row["lease_expires_at"], now):
                # Compare-and-set on the dead claim's task id: one racing producer wins.
                dead = self._rows().filter(
                    _unconfirmed(), key=key, task_id=row["task_id"], lease_expires_at__lte=now
                )
                if dead.update(**fields):
                    return Claim("claimed", task_id, fingerprint, abandoned=row["task_id"])
                continue  # confirmed, started or taken over meanwhile: decide again
            outcome = "duplicate" if row["fingerprint"] == fingerprint else "conflict"
            return Claim(outcome, row["task_id"], row["fingerprint"])
        raise RuntimeError(f"idempotency key {key!r} kept changing during the claim")

    def confirm(self, key: str, task_id: str) -> bool:
        """See :meth:`Ledger.confirm`."""
        rows = self._rows().filter(_unconfirmed(), key=key, task_id=task_id)
        return bool(rows.update(lease_expires_at=None, updated_at=timezone.now()))

    def unclaim(self, key: str, task_id: str) -> bool:
        """See :meth:`Ledger.unclaim`."""
        rows = self._rows().filter(key=key, task_id=task_id, state=PENDING)
        return bool(rows.update(state=RELEASED, updated_at=timezone.now()))

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
    ) -> Start:
        """See :meth:`Ledger.start`."""
        # The conditional UPDATE comes first: a keyed task was usually claimed at enqueue,
        # so its row exists and an INSERT first would fail (a wasted transaction) every run.
        for _ in range(10):
            now = timezone.now()
            lease_until = now + dt.timedelta(seconds=lease)
            new_window = now + dt.timedelta(seconds=window)
            takeable = (
                Q(state__in=[PENDING, FAILED, RELEASED])
                | Q(state=RUNNING, lease_expires_at__lte=now)
                | Q(state=SUCCEEDED, expires_at__lte=now)
            )
            taken = (
                self._rows()
                .filter(takeable, key=key)
                .update(
                    state=RUNNING,
                    task_id=task_id,
                    fingerprint=fingerprint,
                    owner=owner,
                    lease_expires_at=lease_until,
                    fencing_token=F("fencing_token") + 1,
                    updated_at=now,
                    # A key past its window starts a new one; otherwise the window stands.
                    expires_at=Case(
                        When(expires_at__lte=now, then=Value(new_window)),
                        default=F("expires_at"),
                    ),
                )
            )
            if taken:
                token = (
                    self._rows()
                    .filter(key=key, owner=owner)
                    .values_list("fencing_token", flat=True)
                    .first()
                )
                if token is not None:
                    return Start("run", int(token), task_id=task_id)
                continue  # taken over already: a pathological lease; decide again
            if self._insert(
                key=key,
                state=RUNNING,
                task_name=task_name,
                task_id=task_id,
                fingerprint=fingerprint,
                owner=owner,
                lease_expires_at=lease_until,
                fencing_token=1,
                created_at=now,
                updated_at=now,
                expires_at=new_window,
            ):
                return Start("run", 1, task_id=task_id)
            row = (
                self._rows()
                .filter(key=key)
                .values("state", "fencing_token", "lease_expires_at", "task_id")
                .first()
            )
            if row is None:
                continue
            if row["state"] == SUCCEEDED:
                return Start("skip", int(row["fencing_token"]), task_id=row["task_id"])
            if row["state"] == RUNNING and row["lease_expires_at"] > now:
                wait = (row["lease_expires_at"] - now).total_seconds()
                return Start("busy", int(row["fencing_token"]), wait, row["task_id"])
        raise RuntimeError(f"idempotency key {key!r} kept changing during the start")

    def _transition(self, key: str, owner: str, token: int, state: str) -> bool:
        # A run that gave its lease back for a retry whose publish then failed may still
        # record its failure, as long as no next attempt has taken the key.
        held = [RUNNING, PENDING] if state == FAILED else [RUNNING]
        rows = self._rows().filter(key=key, owner=owner, fencing_token=token, state__in=held)
        return bool(rows.update(state=state, updated_at=timezone.now()))

    def finish(self, key: str, *, owner: str, token: int, state: str) -> bool:
        """See :meth:`Ledger.finish`."""
        if state not in (SUCCEEDED, FAILED):
            raise ValueError(f"a run finishes as succeeded or failed, not {state!r}")
        return self._transition(key, owner, token, state)

    def yield_lease(self, key: str, *, owner: str, token: int) -> bool:
        """See :meth:`Ledger.yield_lease`."""
        return self._transition(key, owner, token, PENDING)

    def renew(self, key: str, *, owner: str, token: int, lease: float) -> bool:
        """See :meth:`Ledger.renew`."""
        now = timezone.now()
        rows = self._rows().filter(
            key=key, owner=owner, fencing_token=token, state=RUNNING, lease_expires_at__gt=now
        )
        until = now + dt.timedelta(seconds=lease)
        return bool(rows.update(lease_expires_at=until, updated_at=now))

    def release(self, key: str, task_id: str | None = None) -> bool:
        """See :meth:`Ledger.release`."""
        rows = self._rows().filter(key=key).exclude(state=RELEASED)
        if task_id is not None:
            rows = rows.filter(task_id=task_id)
        return bool(rows.update(state=RELEASED, updated_at=timezone.now()))

    def get(self, key: str) -> dict[str, Any] | None:
        """See :meth:`Ledger.get`."""
        row: dict[str, Any] | None = self._rows().filter(key=key).values().first()
        return row

    def purge(self, retention: float) -> int:
        """See :meth:`Ledger.purge`."""
        now = timezone.now()
        old = self._rows().filter(expires_at__lt=now - dt.timedelta(seconds=retention))
        deleted, _ = old.exclude(state=RUNNING, lease_expires_at__gt=now).delete()
        return int(deleted)


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
  'owner')
local state = h[1]
local function write(abandoned)
  redis.call('HSET', KEYS[1], 'state', 'pending', 'task_name', task_name, 'task_id', task_id,
    'fp', fp, 'owner', '', 'lease_until', now + grace, 'created_at', now, 'updated_at', now,
    'expires_at', now + window)
  redis.call('HSETNX', KEYS[1], 'token', 0)
  touch(retention)
  return {'claimed', task_id, fp, abandoned}
end
if not state then return write('') end
if h[2] == task_id then return {'claimed', task_id, h[3], ''} end
local live_run = state == 'running' and tonumber(h[5]) > now
if state == 'released' or (tonumber(h[4]) <= now and not live_run) then return write('') end
local deadline = tonumber(h[5]) or 0
if state == 'pending' and h[6] == '' and deadline > 0 and deadline <= now then
  return write(h[2])
end
if h[3] == fp then return {'duplicate', h[2], h[3], ''} end
return {'conflict', h[2], h[3], ''}
"""
)

_LUA_CONFIRM = (
    _LUA_PRELUDE
    + """
local h = redis.call('HMGET', KEYS[1], 'state', 'task_id', 'owner', 'lease_until')
if h[1] ~= 'pending' or h[2] ~= ARGV[1] or h[3] ~= '' then return 0 end
if (tonumber(h[4]) or 0) <= 0 then return 0 end
redis.call('HSET', KEYS[1], 'lease_until', 0, 'updated_at', now)
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
if takeable then
  local expires = now + window
  if state and tonumber(h[3]) > now then expires = tonumber(h[3]) end
  local token = redis.call('HINCRBY', KEYS[1], 'token', 1)
  redis.call('HSET', KEYS[1], 'state', 'running', 'task_name', task_name, 'task_id', task_id,
    'fp', fp, 'owner', owner, 'lease_until', now + lease, 'updated_at', now,
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
redis.call('HSET', KEYS[1], 'state', 'released', 'updated_at', now)
return 1
"""
)


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
        args = [task_name, task_id, fingerprint, window, self._retention(), _grace(grace)]
        outcome, holder, fp, abandoned = self._claim(keys=[self._key(key)], args=args)
        return Claim(outcome.decode(), holder.decode(), fp.decode(), abandoned.decode())

    def confirm(self, key: str, task_id: str) -> bool:
        """See :meth:`Ledger.confirm`."""
        return bool(self._confirm(keys=[self._key(key)], args=[task_id]))

    def unclaim(self, key: str, task_id: str) -> bool:
        """See :meth:`Ledger.unclaim`."""
        return bool(self._release(keys=[self._key(key)], args=[task_id, PENDING]))

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
    ) -> Start:
        """See :meth:`Ledger.start`."""
        args = [task_name, task_id, fingerprint, window, self._retention(), owner, lease]
        outcome, token, wait, holder = self._start(keys=[self._key(key)], args=args)
        return Start(outcome.decode(), int(token), float(wait), holder.decode())

    def finish(self, key: str, *, owner: str, token: int, state: str) -> bool:
        """See :meth:`Ledger.finish`."""
        if state not in (SUCCEEDED, FAILED):
            raise ValueError(f"a run finishes as succeeded or failed, not {state!r}")
        return bool(self._transition(keys=[self._key(key)], args=[owner, token, state]))

    def yield_lease(self, key: str, *, owner: str, token: int) -> bool:
        """See :meth:`Ledger.yield_lease`."""
        return bool(self._transition(keys=[self._key(key)], args=[owner, token, PENDING]))

    def renew(self, key: str, *, owner: str, token: int, lease: float) -> bool:
        """See :meth:`Ledger.renew`."""
        args = [owner, token, lease, self._retention()]
        return bool(self._renew(keys=[self._key(key)], args=args))

    def release(self, key: str, task_id: str | None = None) -> bool:
        """See :meth:`Ledger.release`."""
        return bool(self._release(keys=[self._key(key)], args=[task_id or "", ""]))

    def get(self, key: str) -> dict[str, Any] | None:
        """See :meth:`Ledger.get`."""
        raw = self.client.hgetall(self._key(key))
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
            "created_at": _stamp(row.get("created_at")),
            "updated_at": _stamp(row.get("updated_at")),
            "expires_at": _stamp(row.get("expires_at")),
        }

    def purge(self, retention: float) -> int:
        """See :meth:`Ledger.purge` (Redis expires the records itself)."""
        return 0


def _stamp(value: str | None) -> dt.datetime | None:
    if not value or float(value) == 0:
        return None
    return dt.datetime.fromtimestamp(float(value), tz=dt.timezone.utc)


REDIS_SCHEMES = ("redis", "rediss", "unix", "valkey", "valkeys")


def redis_url() -> str:
    """The Redis of the ``"redis"`` ledger: its own setting, else a Redis broker's URL.

    Raises:
        ValueError: No ``CELERY_GUARD_IDEMPOTENCY_REDIS_URL`` and the broker is not Redis.
    """
    url = guard_settings.idempotency_redis_url
    if url is not None:
        return url
    from celery import current_app

    broker = current_app.conf.broker_url
    if not isinstance(broker, str) or broker.split(":", 1)[0] not in REDIS_SCHEMES:
        raise ValueError(
            "the 'redis' idempotency ledger needs CELERY_GUARD_IDEMPOTENCY_REDIS_URL when "
            "the broker is not Redis"
        )
    return broker


@functools.lru_cache(maxsize=16)
def redis_ledger(url: str, prefix: str) -> RedisLedger:
    """Return this process's Redis ledger for ``url`` and ``prefix`` (built once).

    One client, so one connection pool, per process: a ledger built per call would open a new
    connection for every enqueue and every run.
    """
    return RedisLedger(url, prefix)


def get_ledger() -> Ledger:
    """Return the ledger ``CELERY_GUARD_IDEMPOTENCY_BACKEND`` selects."""
    backend = guard_settings.idempotency_backend
    if backend == "database":
        return DatabaseLedger()
    if backend == "redis":
        return redis_ledger(redis_url(), guard_settings.idempotency_redis_prefix)
    raise ValueError(
        f"CELERY_GUARD_IDEMPOTENCY_BACKEND must be 'database' or 'redis', got {backend!r}"
    )
