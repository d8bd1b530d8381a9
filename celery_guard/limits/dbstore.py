"""The limits store in the database: the Redis store's semantics, in short SQL transactions.

Selected by ``CELERY_GUARD_LIMITS_BACKEND = "database"`` (the default when there is no Redis
for the limits). Two tables (:mod:`celery_guard.limits.models`):

- ``LimitScope``, one row per rule scope: the row an admission locks, and the scope's
  back-off. Admissions that share a scope are serialised on it: ``SELECT ... FOR UPDATE`` on
  PostgreSQL, the rows of a run locked in scope order so two runs never deadlock; SQLite
  serialises every write transaction anyway (the admission writes first, so it holds the
  write lock before it reads).
- ``LimitEntry``, one row per held concurrency slot (a lease, live until its expiry, pushed
  on by the renewal thread) and per recorded start (live until it leaves its rate's window,
  start + period). A rule admits a run while fewer than its limit of its entries are live:
  concurrency and rate are counted the same way, the rate with a tolerance of zero starts,
  like the Redis sliding log.

An admission is one transaction: lock the run's scopes, count their live entries (and read
the clock), insert the run's entries only if every rule admits it (all or nothing), commit.
On PostgreSQL that transaction is one call of the function ``celery_guard_limits_admit``
(migration ``0011``, PL/pgSQL): one round trip, in the implicit transaction of its statement;
being VOLATILE, each statement of it reads with a new snapshot (READ COMMITTED), so its
counts, made once the locks are held, see the entries of the admissions that held them before.
On SQLite it stays a transaction of several statements, in process (the scope rows written
first, then the count and the insert); the release is one ``DELETE`` (autocommit) on both.
On PostgreSQL the admission's call and the release are prepared once per database session
(:func:`celery_guard.core.prepared.execute_hot`): not parsed and planned on every call.
Times are epoch seconds from the database server's clock on PostgreSQL (``clock_timestamp()``,
read after the locks are held), so the workers' clocks do not matter; on SQLite, whose
workers share one host, from that host's clock. On PostgreSQL both tables are ``UNLOGGED``
(migration ``0009``): what they hold expires within seconds, so it needs no WAL, and a
commit does not wait for a disk flush (a transaction that wrote no WAL commits without one,
whatever ``synchronous_commit`` says: ``docs/limits.md``).

Expired entries, and scopes with no entry and no back-off, are purged by the admissions
themselves, at most every :data:`PURGE_EVERY` seconds per process, so the tables hold about
the live slots and starts (plus what expired since the last purge).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import uuid
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, TypeVar

from django.db import Error as DatabaseError
from django.db import connections, router, transaction

from celery_guard.core import dbreuse, prepared
from celery_guard.limits.base import Admission, Unavailable
from celery_guard.limits.models import LimitEntry, LimitScope
from celery_guard.limits.rules import Rule

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds between two purges of expired rows by one process.
PURGE_EVERY = 5.0
#: Seconds an expired entry is kept before a purge deletes it (none counts once expired).
PURGE_GRACE = 1.0
#: Seconds the store is left alone after a database error (no timeout per task).
OUTAGE_PAUSE = 2.0
#: Longest scope stored verbatim (longer ones keep a prefix and a digest).
MAX_SCOPE = 255

#: PostgreSQL's admission in one call (migration ``0011``), with its argument types.
ADMIT_FUNCTION = (
    "celery_guard_limits_admit(text[], integer[], integer[], double precision[], "
    "double precision, text)"
)

SLOT = LimitEntry.Kind.SLOT.value
START = LimitEntry.Kind.START.value

#: PostgreSQL: the admission's call, prepared in each session (the casts serve the unprepared
#: fallback, whose arrays are bound as literals).
ADMIT_SQL = (
    "SELECT admitted, refused, kind, wait FROM celery_guard_limits_admit("
    "%(keys)s::text[], %(concurrency)s::integer[], %(rate)s::integer[], "
    "%(period)s::float8[], %(lease)s, %(holder)s)"
)
#: Types of the prepared statements' parameters (the others are text).
_PARAM_TYPES = {
    "keys": "text[]",
    "concurrency": "integer[]",
    "rate": "integer[]",
    "period": "float8[]",
    "lease": "float8",
}

_paused_until = 0.0


def scope_key(scope: str) -> str:
    """The stored name of a rule's scope (a digest keeps a long one unique and short)."""
    if len(scope) <= MAX_SCOPE:
        return scope
    digest = hashlib.sha256(scope.encode()).hexdigest()
    return f"{scope[: MAX_SCOPE - len(digest) - 1]}#{digest}"


def _marks(count: int) -> str:
    return ", ".join(["%s"] * count)


class DatabaseStore:
    """The database limits store (one per process and database alias, see :func:`get_store`)."""

    #: No reservations: a refused run is deferred by the time the store returns.
    reserves = False

    def __init__(self, alias: str | None = None) -> None:
        self.alias = alias or router.db_for_write(LimitEntry) or "default"
        connection = connections[self.alias]
        self.server_clock = connection.vendor == "postgresql"
        #: Admit through ``celery_guard_limits_admit`` (migration ``0011``): one round trip.
        self.one_call = connection.vendor == "postgresql"
        self.row_locks = bool(connection.features.has_select_for_update)
        quote = connection.ops.quote_name
        self.scopes = quote(LimitScope._meta.db_table)
        self.entries = quote(LimitEntry._meta.db_table)
        self._next_purge = 0.0

    def _now(self) -> tuple[str, list[Any]]:
        """SQL for "now" in epoch seconds, and its parameters: the server's clock on PostgreSQL."""
        if self.server_clock:
            return "EXTRACT(EPOCH FROM clock_timestamp())::float8", []
        return "%s", [time.time()]

    def _guarded(self, call: Callable[[], T]) -> T:
        global _paused_until
        if time.monotonic() < _paused_until:
            raise Unavailable("the limits database was unreachable moments ago")
        try:
            return call()
        except DatabaseError as exc:
            _paused_until = time.monotonic() + OUTAGE_PAUSE
            dbreuse.close_unusable()
            raise Unavailable(str(exc)) from exc

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

        The database store keeps no reservations (``reserves`` is false): ``reserve`` and
        ``held`` are accepted for the common interface and ignored.

        Raises:
            Unavailable: The database cannot be reached.
        """
        holder = holder or f"{os.getpid()}:{uuid.uuid4().hex}"
        answer = self._guarded(lambda: self._admit(rules, lease, holder))
        if time.monotonic() >= self._next_purge:
            self._next_purge = time.monotonic() + PURGE_EVERY
            try:
                self.purge()
            except Unavailable:
                logger.warning("celery_guard: could not purge the expired limit entries")
        return answer

    def _admit(self, rules: Sequence[Rule], lease: float, holder: str) -> Admission:
        keys = [scope_key(rule.scope) for rule in rules]
        if not keys:
            return Admission(True, holder)
        if self.one_call:
            return self._admit_in_one_call(rules, keys, lease, holder)
        with transaction.atomic(using=self.alias), connections[self.alias].cursor() as cursor:
            backoffs = self._lock(cursor, keys)
            now_sql, now_args = self._now()
            cursor.execute(
                f"SELECT n.now, e.scope, e.kind, COUNT(e.id), MIN(e.until) "
                f"FROM (SELECT {now_sql} AS now) n LEFT JOIN {self.entries} e "
                f"ON e.scope IN ({_marks(len(keys))}) AND e.until > n.now "
                "GROUP BY n.now, e.scope, e.kind",
                [*now_args, *keys],
            )
            counts: dict[tuple[str, str], tuple[int, float]] = {}
            now = 0.0
            for row in cursor.fetchall():
                now = float(row[0])
                if row[1] is not None:
                    counts[(row[1], row[2])] = (int(row[3]), float(row[4]))
            rows: list[Any] = []
            taken: set[tuple[str, str]] = set()  # one entry per scope and kind, as in Redis
            for rule, key in zip(rules, keys, strict=True):
                if backoffs[key] > now:
                    return Admission(False, holder, rule, "backoff", backoffs[key] - now)
                if rule.concurrency:
                    held, first = counts.get((key, SLOT), (0, now))
                    if held >= rule.concurrency:
                        return Admission(False, holder, rule, "concurrency", first - now)
                    if (key, SLOT) not in taken:
                        taken.add((key, SLOT))
                        rows += [key, SLOT, holder, now + lease]
                if rule.rate:
                    started, first = counts.get((key, START), (0, now))
                    if started >= rule.rate.count:
                        return Admission(False, holder, rule, "rate", first - now)
                    if (key, START) not in taken:
                        taken.add((key, START))
                        rows += [key, START, holder, now + rule.rate.period]
            if rows:
                cursor.execute(
                    f"INSERT INTO {self.entries} (scope, kind, holder, until) VALUES "
                    + ", ".join(["(%s, %s, %s, %s)"] * (len(rows) // 4)),
                    rows,
                )
        return Admission(True, holder)

    def _admit_in_one_call(
        self, rules: Sequence[Rule], keys: Sequence[str], lease: float, holder: str
    ) -> Admission:
        """PostgreSQL: the same admission in one round trip, ``celery_guard_limits_admit``.

        The function (migration ``0011``) locks, counts and inserts as the transaction of
        :meth:`_admit` does elsewhere, in the implicit transaction of its one statement. The
        call is prepared in the session (:func:`celery_guard.core.prepared.execute_hot`).
        """
        admitted, refused, kind, wait = self._execute_hot(
            "celery_guard_limits_admit_call",
            ADMIT_SQL,
            {
                "keys": list(keys),
                "concurrency": [rule.concurrency or 0 for rule in rules],
                "rate": [rule.rate.count if rule.rate else 0 for rule in rules],
                "period": [rule.rate.period if rule.rate else 0.0 for rule in rules],
                "lease": lease,
                "holder": holder,
            },
            {},
            row=True,
        )
        if admitted:
            return Admission(True, holder)
        return Admission(False, holder, rules[refused - 1], str(kind), float(wait))

    def _lock(self, cursor: Any, keys: Sequence[str]) -> dict[str, float]:
        """Lock the scope rows of ``keys`` (created when missing), in order: their back-offs."""
        wanted = sorted(set(keys))
        lock = " FOR UPDATE" if self.row_locks else ""
        select = (
            f"SELECT scope, backoff_until FROM {self.scopes} "
            f"WHERE scope IN ({_marks(len(wanted))}) ORDER BY scope{lock}"
        )
        if not self.row_locks:
            # SQLite: a write first, so this transaction takes the database's write lock
            # before it reads (a read-then-write transaction could not upgrade under load).
            self._create(wanted)
        for _ in range(3):
            cursor.execute(select, wanted)
            found = {str(scope): float(until) for scope, until in cursor.fetchall()}
            if len(found) == len(wanted):
                return found
            # A scope's first run, or its row was just purged: create it, then lock it.
            self._create([key for key in wanted if key not in found])
        raise Unavailable(f"the limit scopes {wanted!r} could not be locked")

    def _create(self, keys: Sequence[str]) -> None:
        # One INSERT that skips the scopes another process created meanwhile.
        LimitScope.objects.using(self.alias).bulk_create(
            [LimitScope(scope=key) for key in keys], ignore_conflicts=True
        )

    def release(self, rules: Sequence[Rule], holder: str) -> None:
        """Give back the concurrency slots ``holder`` took (one ``DELETE``).

        On PostgreSQL the ``DELETE`` is prepared in the session, so it is not planned again
        on every release (:func:`celery_guard.core.prepared.execute_hot`).

        Raises:
            Unavailable: The database cannot be reached (the slots return when their lease
                ends).
        """
        if any(rule.concurrency for rule in rules):
            self._guarded(
                lambda: self._execute_hot(
                    "celery_guard_limits_release",
                    f"DELETE FROM {self.entries} WHERE holder = %(holder)s AND kind = %(kind)s",
                    {"holder": holder, "kind": SLOT},
                    {"kind": SLOT},
                )
            )

    def renew(self, rules: Sequence[Rule], holder: str, lease: float) -> None:
        """Extend ``holder``'s live concurrency leases by ``lease`` seconds from now.

        An expired lease is not revived: its slot may be someone else's.

        Raises:
            Unavailable: The database cannot be reached.
        """
        if not any(rule.concurrency for rule in rules):
            return
        now_sql, now_args = self._now()
        self._execute(
            f"UPDATE {self.entries} SET until = {now_sql} + %s "
            f"WHERE holder = %s AND kind = %s AND until > {now_sql}",
            [*now_args, lease, holder, SLOT, *now_args],
        )

    def back_off(self, rules: Sequence[Rule], seconds: float) -> None:
        """Admit no run under ``rules`` for ``seconds`` (lengthens a back-off, never shortens).

        Raises:
            Unavailable: The database cannot be reached.
        """
        keys = sorted({scope_key(rule.scope) for rule in rules})
        if not keys or seconds <= 0:
            return

        def write() -> None:
            now_sql, now_args = self._now()
            with transaction.atomic(using=self.alias), connections[self.alias].cursor() as cursor:
                self._lock(cursor, keys)
                cursor.execute(
                    f"UPDATE {self.scopes} SET backoff_until = {now_sql} + %s "
                    f"WHERE scope IN ({_marks(len(keys))}) AND backoff_until < {now_sql} + %s",
                    [*now_args, seconds, *keys, *now_args, seconds],
                )

        self._guarded(write)

    def holders(self, rule: Rule) -> int:
        """How many live holders a rule's concurrency has now (admin, tests)."""
        now_sql, now_args = self._now()
        with connections[self.alias].cursor() as cursor:
            cursor.execute(
                f"SELECT COUNT(*) FROM {self.entries} "
                f"WHERE scope = %s AND kind = %s AND until > {now_sql}",
                [scope_key(rule.scope), SLOT, *now_args],
            )
            return int(cursor.fetchone()[0])

    def ping(self) -> None:
        """One round trip to the database's limits tables (``doctor``: also migrated?).

        On PostgreSQL it also asks for the admission function (migration ``0011``): the
        cast fails when it is missing.
        """
        select = f"SELECT (SELECT scope FROM {self.scopes} WHERE 1 = 0)"
        if self.one_call:
            select += f", '{ADMIT_FUNCTION}'::regprocedure"
        with connections[self.alias].cursor() as cursor:
            cursor.execute(select)

    def purge(self) -> int:
        """Delete expired entries, and scopes with neither entries nor a back-off.

        A scope row some admission holds is skipped (PostgreSQL: ``SKIP LOCKED``), so a purge
        never waits for an admission nor deadlocks with one.

        Returns:
            The number of rows deleted.

        Raises:
            Unavailable: The database cannot be reached.
        """
        now_sql, now_args = self._now()
        skip = " FOR UPDATE SKIP LOCKED" if self.row_locks else ""

        def delete() -> int:
            with connections[self.alias].cursor() as cursor:
                cursor.execute(
                    f"DELETE FROM {self.entries} WHERE until < {now_sql} - %s",
                    [*now_args, PURGE_GRACE],
                )
                deleted = int(cursor.rowcount)
                cursor.execute(
                    f"DELETE FROM {self.scopes} WHERE id IN (SELECT s.id FROM {self.scopes} s "
                    f"WHERE s.backoff_until < {now_sql} AND NOT EXISTS (SELECT 1 FROM "
                    f"{self.entries} e WHERE e.scope = s.scope){skip})",
                    now_args,
                )
                return deleted + int(cursor.rowcount)

        return self._guarded(delete)

    def _execute_hot(
        self,
        name: str,
        sql: str,
        params: Mapping[str, Any],
        constants: Mapping[str, str],
        *,
        row: bool = False,
    ) -> Any:
        """Run a per-task statement, prepared in the session (PostgreSQL).

        Args:
            name: The prepared statement's name.
            sql: The statement, with ``%(key)s`` placeholders.
            params: Every placeholder's value.
            constants: The placeholders whose value is the same in every execution.
            row: Return the statement's first row (else None).
        """
        connection = connections[self.alias]
        with connection.cursor() as cursor:
            prepared.execute_hot(connection, cursor, name, sql, params, constants, _PARAM_TYPES)
            return cursor.fetchone() if row else None

    def _execute(self, sql: str, args: Sequence[Any]) -> None:
        def run() -> None:
            with connections[self.alias].cursor() as cursor:
                cursor.execute(sql, args)

        self._guarded(run)


_stores: dict[tuple[int, str], DatabaseStore] = {}


def get_store(alias: str | None = None) -> DatabaseStore:
    """This process's database store (on the database the router gives ``LimitEntry``)."""
    key = (os.getpid(), alias or "")
    found = _stores.get(key)
    if found is None:
        found = _stores[key] = DatabaseStore(alias)
    return found
