"""The database idempotency ledger (``IdempotencyRecord`` rows, conditional updates)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from typing import Any

from django.db import connections, router, transaction
from django.db.models import Q
from django.utils import timezone

from celery_guard.core import inserts
from celery_guard.idempotency.ledger.base import (
    Claim,
    Ledger,
    NewClaim,
    Start,
    publish_grace,
    start_bound,
)
from celery_guard.idempotency.models import KeyState

#: Rows per statement of the bulk claim and confirm (parameters stay far below the limits
#: of PostgreSQL and SQLite).
BULK = 500
#: The columns the bulk claim inserts.
_INSERTED = (
    "key",
    "task_name",
    "task_id",
    "fingerprint",
    "state",
    "fencing_token",
    "owner",
    "lease_expires_at",
    "created_at",
    "updated_at",
    "expires_at",
)


def _unconfirmed() -> Q:
    """Records that are claims whose publish is not confirmed yet (see the module doc)."""
    return Q(state=KeyState.PENDING, owner="", lease_expires_at__isnull=False)


def _abandoned(row: dict[str, Any], now: dt.datetime) -> str:
    """Why a claim was abandoned: ``"unconfirmed"``, ``"never started"``, or ``""`` (held)."""
    if row["state"] != KeyState.PENDING or row["owner"] != "":
        return ""
    if row["lease_expires_at"] is not None:
        return "unconfirmed" if row["lease_expires_at"] <= now else ""
    start_by = row["start_by"]
    return "never started" if start_by is not None and start_by <= now else ""


def _plain(value: Any) -> Any:
    """A value as the database driver takes it: a state enum as its text."""
    return value.value if isinstance(value, KeyState) else value


#: The text of the ledger's per-call statements, by database vendor and statement (see
#: :func:`_statement`).
_STATEMENTS: dict[tuple[str, str], str] = {}

_RUNNING = KeyState.RUNNING.value
_PENDING = KeyState.PENDING.value
_SUCCEEDED = KeyState.SUCCEEDED.value
#: States a start takes over whatever their lease and window (see :meth:`DatabaseLedger.start`).
_TAKEABLE = (KeyState.PENDING.value, KeyState.FAILED.value, KeyState.RELEASED.value)


def _statement(connection: Any, name: str, build: Callable[[Callable[[str], str]], str]) -> str:
    """The SQL of statement ``name`` on ``connection``'s vendor, written once per process.

    ``build`` gets a function from a field name of the record to its quoted column (``"table"``
    gives the quoted table). Every delivery of a keyed task starts and finishes its key, and
    every keyed enqueue claims and confirms one: the ORM would build, resolve and compile the
    same statements each time, several times the client time of the round trip itself
    (issue 12). Only the parameters change.
    """
    key = (connection.vendor, name)
    sql = _STATEMENTS.get(key)
    if sql is None:
        from celery_guard.idempotency.models import IdempotencyRecord

        meta = IdempotencyRecord._meta
        quote = connection.ops.quote_name
        columns = {f.name: str(f.column) for f in meta.concrete_fields}
        columns["table"] = str(meta.db_table)

        def column(field: str) -> str:
            return str(quote(columns[field]))

        sql = _STATEMENTS[key] = build(column)
    return sql


def _start_sql(reclaim: bool) -> Callable[[Callable[[str], str]], str]:
    """The conditional ``UPDATE ... RETURNING`` of :meth:`DatabaseLedger.start`."""

    def build(c: Callable[[str], str]) -> str:
        takeable = (
            f"{c('state')} IN (%s, %s, %s)"
            f" OR ({c('state')} = %s AND {c('lease_expires_at')} <= %s)"
            f" OR ({c('state')} = %s AND {c('expires_at')} <= %s)"
        )
        if reclaim:
            takeable += f" OR ({c('state')} = %s AND {c('task_id')} = %s)"
        return (
            f"UPDATE {c('table')} SET {c('state')} = %s, {c('task_id')} = %s, "
            f"{c('fingerprint')} = %s, {c('owner')} = %s, {c('lease_expires_at')} = %s, "
            f"{c('start_by')} = NULL, {c('fencing_token')} = {c('fencing_token')} + 1, "
            f"{c('updated_at')} = %s, "
            # A key past its window starts a new one; otherwise the window stands.
            f"{c('expires_at')} = CASE WHEN {c('expires_at')} <= %s THEN %s "
            f"ELSE {c('expires_at')} END "
            f"WHERE {c('key')} = %s AND ({takeable}) RETURNING {c('fencing_token')}"
        )

    return build


_START_SQL = {False: _start_sql(False), True: _start_sql(True)}


def _transition_sql(held: int) -> Callable[[Callable[[str], str]], str]:
    """The conditional ``UPDATE`` of a held run's end (``held``: how many states hold it)."""

    def build(c: Callable[[str], str]) -> str:
        states = ", ".join(["%s"] * held)
        return (
            f"UPDATE {c('table')} SET {c('state')} = %s, {c('updated_at')} = %s "
            f"WHERE {c('key')} = %s AND {c('owner')} = %s AND {c('fencing_token')} = %s "
            f"AND {c('state')} IN ({states})"
        )

    return build


_TRANSITION_SQL = {n: (f"transition-{n}", _transition_sql(n)) for n in (1, 2)}


def _confirm_sql(c: Callable[[str], str]) -> str:
    """The conditional ``UPDATE`` of :meth:`DatabaseLedger.confirm` (see :func:`_unconfirmed`)."""
    return (
        f"UPDATE {c('table')} SET {c('lease_expires_at')} = NULL, {c('start_by')} = %s, "
        f"{c('updated_at')} = %s WHERE {c('key')} = %s AND {c('task_id')} = %s "
        f"AND {c('state')} = %s AND {c('owner')} = '' AND {c('lease_expires_at')} IS NOT NULL"
    )


#: The fields a claim writes, in the order of :func:`_claim_sql`'s parameters.
_CLAIMED = (
    "state",
    "task_name",
    "task_id",
    "fingerprint",
    "owner",
    "lease_expires_at",
    "start_by",
    "created_at",
    "updated_at",
    "expires_at",
)


class _Quoted:
    """``{c[field]}`` in a format string: the quoted column of ``field``."""

    def __init__(self, column: Callable[[str], str]) -> None:
        self.column = column

    def __getitem__(self, field: str) -> str:
        return self.column(field)


def _claim_sql(where: str) -> Callable[[Callable[[str], str]], str]:
    """A claim's ``UPDATE`` of an existing record, whose ``WHERE`` ``where`` writes."""

    def build(c: Callable[[str], str]) -> str:
        assignments = ", ".join(f"{c(name)} = %s" for name in _CLAIMED)
        return f"UPDATE {c('table')} SET {assignments} WHERE {where.format(c=_Quoted(c))}"

    return build


#: A record free for a new claim: released, or past its window and not a live run.
_CLAIM_FREE = (
    "{c[key]} = %s AND ({c[state]} = %s OR ({c[expires_at]} <= %s AND NOT ("
    "{c[lease_expires_at]} > %s AND {c[lease_expires_at]} IS NOT NULL AND {c[state]} = %s)))"
)
#: The abandoned claim of a given task id: unconfirmed past its publish grace...
_CLAIM_UNCONFIRMED = (
    "{c[key]} = %s AND {c[task_id]} = %s AND {c[state]} = %s AND {c[owner]} = '' "
    "AND {c[lease_expires_at]} <= %s"
)
#: ... or confirmed but never started by its start-by time.
_CLAIM_NEVER_STARTED = (
    "{c[key]} = %s AND {c[task_id]} = %s AND {c[state]} = %s AND {c[owner]} = '' "
    "AND {c[lease_expires_at]} IS NULL AND {c[start_by]} <= %s"
)
_CLAIM_SQL = {
    "free": _claim_sql(_CLAIM_FREE),
    "unconfirmed": _claim_sql(_CLAIM_UNCONFIRMED),
    "never started": _claim_sql(_CLAIM_NEVER_STARTED),
}


def _row_sql(columns: tuple[str, ...]) -> Callable[[Callable[[str], str]], str]:
    """The read of ``columns`` of one record by key."""

    def build(c: Callable[[str], str]) -> str:
        return (
            f"SELECT {', '.join(c(name) for name in columns)} FROM {c('table')} "
            f"WHERE {c('key')} = %s"
        )

    return build


#: The datetime fields a read may return.
_DATETIMES = frozenset({"lease_expires_at", "start_by", "expires_at", "created_at", "updated_at"})
#: What a claim reads of a record it could not take, and what a start reads.
_CLAIM_ROW: tuple[str, ...] = (
    "task_id",
    "fingerprint",
    "state",
    "owner",
    "lease_expires_at",
    "start_by",
)
_START_ROW: tuple[str, ...] = ("state", "fencing_token", "lease_expires_at", "task_id")
_ROW_SQL: dict[tuple[str, ...], Callable[[Callable[[str], str]], str]] = {
    columns: _row_sql(columns) for columns in (_CLAIM_ROW, _START_ROW)
}


def _renew_sql(c: Callable[[str], str]) -> str:
    """The conditional ``UPDATE`` of :meth:`DatabaseLedger.renew`."""
    return (
        f"UPDATE {c('table')} SET {c('lease_expires_at')} = %s, {c('updated_at')} = %s "
        f"WHERE {c('key')} = %s AND {c('owner')} = %s AND {c('fencing_token')} = %s "
        f"AND {c('state')} = %s AND {c('lease_expires_at')} > %s"
    )


class DatabaseLedger(Ledger):
    """Ledger in the Django database (:class:`celery_guard.models.IdempotencyRecord`).

    Works on PostgreSQL and SQLite: an insert relies on the unique key, and every other
    transition is a single conditional ``UPDATE`` whose ``WHERE`` is the precondition.
    """

    @staticmethod
    def _model() -> Any:
        from celery_guard.idempotency.models import IdempotencyRecord

        return IdempotencyRecord

    def using(self) -> str:
        """Database alias the ledger writes to."""
        return str(router.db_for_write(self._model()))

    def _insert(self, **fields: Any) -> bool:
        """Insert a record unless its key exists; True when it went in.

        One autocommit statement (``ON CONFLICT (key) DO NOTHING``) where an insert that may
        fail on the unique key takes a transaction (``BEGIN``, ``INSERT``, ``COMMIT`` or
        ``ROLLBACK``): a new key is the usual case of a claim.
        """
        defaults = {
            field.name: field.get_default()
            for field in self._model()._meta.concrete_fields
            if field.has_default() and field.name not in fields
        }
        fields = {**defaults, **fields}
        names = list(fields)
        inserted = inserts.insert_new(
            self._model(),
            self.using(),
            names,
            [[_plain(fields[n]) for n in names]],
            unique="key",
            returning="key",
        )
        return bool(inserted)

    def _rows(self) -> Any:
        return self._model().objects.using(self.using())

    def _execute(
        self, name: str, build: Callable[[Callable[[str], str]], str], params: Sequence[Any]
    ) -> tuple[int, Any]:
        """Run statement ``name`` (see :func:`_statement`) with ``params``, in one round trip.

        Datetimes are adapted as the ORM adapts them; like ``QuerySet.update()``, an error
        inside an atomic block marks it for rollback.

        Returns:
            The rows changed, and the first column of the first row returned (or None).
        """
        alias = self.using()
        connection = connections[alias]
        sql = _statement(connection, name, build)
        adapt = connection.ops.adapt_datetimefield_value
        values = [adapt(v) if isinstance(v, dt.datetime) else v for v in params]
        with transaction.mark_for_rollback_on_error(using=alias), connection.cursor() as cursor:
            cursor.execute(sql, values)
            row = cursor.fetchone() if cursor.description else None
            return cursor.rowcount, None if row is None else row[0]

    def _row(self, key: str, columns: tuple[str, ...]) -> dict[str, Any] | None:
        """``columns`` of the record of ``key``, as the ORM reads them, or None: one ``SELECT``."""
        alias = self.using()
        connection = connections[alias]
        sql = _statement(connection, "row-" + "-".join(columns), _ROW_SQL[columns])
        with transaction.mark_for_rollback_on_error(using=alias), connection.cursor() as cursor:
            cursor.execute(sql, [key])
            row = cursor.fetchone()
        if row is None:
            return None
        found = dict(zip(columns, row, strict=True))
        # PostgreSQL returns aware datetimes; SQLite returns text the ORM would convert.
        convert = getattr(connection.ops, "convert_datetimefield_value", None)
        if convert is not None:
            for name in columns:
                if name in _DATETIMES:
                    found[name] = convert(found[name], None, connection)
        return found

    def _claim_update(self, where: str, fields: dict[str, Any], params: list[Any]) -> bool:
        """Write claim ``fields`` over the record that ``_CLAIM_SQL[where]`` with ``params``
        matches; True when it did."""
        values = [_plain(fields[name]) for name in _CLAIMED] + params
        changed, _ = self._execute("claim-" + where, _CLAIM_SQL[where], values)
        return bool(changed)

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
        grace = publish_grace(grace)
        for _ in range(10):
            now = timezone.now()
            fields = {
                "state": KeyState.PENDING,
                "task_name": task_name,
                "task_id": task_id,
                "fingerprint": fingerprint,
                "owner": "",
                "lease_expires_at": now + dt.timedelta(seconds=grace),
                "start_by": None,
                "created_at": now,
                "updated_at": now,
                "expires_at": now + dt.timedelta(seconds=window),
            }
            if self._insert(key=key, **fields):
                return Claim("claimed", task_id, fingerprint)
            # Free: released, or past its window and not a live run.
            free = [key, KeyState.RELEASED.value, now, now, _RUNNING]
            if self._claim_update("free", fields, free):
                return Claim("claimed", task_id, fingerprint)
            row = self._row(key, _CLAIM_ROW)
            if row is None:  # purged between the two statements: try again
                continue
            if row["task_id"] == task_id:
                return Claim("claimed", task_id, row["fingerprint"])
            why = _abandoned(row, now)
            if why:
                # Compare-and-set on the dead claim's task id: one racing producer wins.
                dead = [key, row["task_id"], _PENDING, now]
                if self._claim_update(why, fields, dead):
                    never_started = why == "never started"
                    return Claim("claimed", task_id, fingerprint, row["task_id"], never_started)
                continue  # confirmed, started or taken over meanwhile: decide again
            outcome = "duplicate" if row["fingerprint"] == fingerprint else "conflict"
            return Claim(outcome, row["task_id"], row["fingerprint"])
        raise RuntimeError(f"idempotency key {key!r} kept changing during the claim")

    def claim_many(
        self, claims: Sequence[NewClaim], *, task_name: str, grace: float | None = None
    ) -> list[Claim]:
        """See :meth:`Ledger.claim_many`.

        One ``INSERT ... ON CONFLICT (key) DO NOTHING RETURNING key`` per :data:`BULK` keys
        (PostgreSQL, SQLite >= 3.35): a new key, the usual case of a bulk run, is claimed by
        that insert. A key that exists already takes :meth:`claim`'s own path.
        """
        grace = publish_grace(grace)
        inserted: set[str] = set()
        for start in range(0, len(claims), BULK):
            inserted |= self._insert_new(claims[start : start + BULK], task_name, grace)
        existing = [c for c in claims if c.key not in inserted]
        decided = dict(
            zip(
                (c.key for c in existing),
                super().claim_many(existing, task_name=task_name, grace=grace),
                strict=True,
            )
        )
        return [decided.get(c.key) or Claim("claimed", c.task_id, c.fingerprint) for c in claims]

    def _insert_new(self, claims: Sequence[NewClaim], task_name: str, grace: float) -> set[str]:
        """Insert the claims of keys that have no record; return the keys inserted."""
        now = timezone.now()
        deadline = now + dt.timedelta(seconds=grace)
        pending = KeyState.PENDING.value
        rows = [
            (c.key, task_name, c.task_id, c.fingerprint, pending, 0, "", deadline, now, now, end)
            for c in claims
            for end in [now + dt.timedelta(seconds=c.window)]
        ]
        keys = inserts.insert_new(
            self._model(), self.using(), _INSERTED, rows, unique="key", returning="key"
        )
        return {str(key) for key in keys}

    def confirm(
        self, key: str, task_id: str, start_within: float | None = None, *, wait: bool = True
    ) -> bool:
        """See :meth:`Ledger.confirm` (always waits: one conditional ``UPDATE``)."""
        now = timezone.now()
        start_by = now + dt.timedelta(seconds=start_bound(start_within))
        params = [start_by, now, key, task_id, _PENDING]
        changed, _ = self._execute("confirm", _confirm_sql, params)
        return bool(changed)

    def confirm_many(
        self, published: Sequence[tuple[str, str]], start_within: float | None = None
    ) -> int:
        """See :meth:`Ledger.confirm_many`: one ``UPDATE`` per :data:`BULK` claims.

        A row matches when its key and its task id are both among the batch's: a key is
        claimed by one call of the batch and a task id claims one key, so that is the row of
        the pair itself.
        """
        now = timezone.now()
        start_by = now + dt.timedelta(seconds=start_bound(start_within))
        changed = 0
        for start in range(0, len(published), BULK):
            chunk = published[start : start + BULK]
            rows = self._rows().filter(
                _unconfirmed(),
                key__in=[key for key, _ in chunk],
                task_id__in=[task_id for _, task_id in chunk],
            )
            changed += rows.update(lease_expires_at=None, start_by=start_by, updated_at=now)
        return changed

    def unclaim(self, key: str, task_id: str) -> bool:
        """See :meth:`Ledger.unclaim`."""
        rows = self._rows().filter(key=key, task_id=task_id, state=KeyState.PENDING)
        return bool(rows.update(state=KeyState.RELEASED, updated_at=timezone.now()))

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
        # The conditional UPDATE comes first: a keyed task was usually claimed at enqueue,
        # so its row exists and an INSERT first would fail (a wasted transaction) every run.
        for _ in range(10):
            now = timezone.now()
            lease_until = now + dt.timedelta(seconds=lease)
            new_window = now + dt.timedelta(seconds=window)
            # One statement, one commit: the UPDATE returns the new fencing token itself.
            # Takeable: pending, failed or released; running past its lease; succeeded past
            # its window; with ``reclaim``, running under this very task id.
            params: list[Any] = [
                _RUNNING,
                task_id,
                fingerprint,
                owner,
                lease_until,
                now,
                now,
                new_window,
                key,
                *_TAKEABLE,
                _RUNNING,
                now,
                _SUCCEEDED,
                now,
            ]
            if reclaim:
                params += [_RUNNING, task_id]
            name = "start-reclaim" if reclaim else "start"
            _, token = self._execute(name, _START_SQL[reclaim], params)
            if token is not None:
                return Start("run", int(token), task_id=task_id)
            if self._insert(
                key=key,
                state=KeyState.RUNNING,
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
            row = self._row(key, _START_ROW)
            if row is None:
                continue
            if row["state"] == KeyState.SUCCEEDED:
                return Start("skip", int(row["fencing_token"]), task_id=row["task_id"])
            if row["state"] == KeyState.RUNNING and row["lease_expires_at"] > now:
                wait = (row["lease_expires_at"] - now).total_seconds()
                return Start("busy", int(row["fencing_token"]), wait, row["task_id"])
        raise RuntimeError(f"idempotency key {key!r} kept changing during the start")

    def _transition(self, key: str, owner: str, token: int, state: str) -> bool:
        # A run that gave its lease back for a retry whose publish then failed may still
        # record its failure, as long as no next attempt has taken the key.
        held = (
            [KeyState.RUNNING, KeyState.PENDING] if state == KeyState.FAILED else [KeyState.RUNNING]
        )
        params = [_plain(state), timezone.now(), key, owner, token, *map(_plain, held)]
        changed, _ = self._execute(*_TRANSITION_SQL[len(held)], params)
        return bool(changed)

    def finish(self, key: str, *, owner: str, token: int, state: str) -> bool:
        """See :meth:`Ledger.finish`."""
        if state not in (KeyState.SUCCEEDED, KeyState.FAILED):
            raise ValueError(f"a run finishes as succeeded or failed, not {state!r}")
        return self._transition(key, owner, token, state)

    def yield_lease(self, key: str, *, owner: str, token: int) -> bool:
        """See :meth:`Ledger.yield_lease`."""
        return self._transition(key, owner, token, KeyState.PENDING)

    def renew(self, key: str, *, owner: str, token: int, lease: float) -> bool:
        """See :meth:`Ledger.renew`."""
        now = timezone.now()
        until = now + dt.timedelta(seconds=lease)
        params = [until, now, key, owner, token, _RUNNING, now]
        changed, _ = self._execute("renew", _renew_sql, params)
        return bool(changed)

    def release(
        self, key: str, task_id: str | None = None, *, keep_succeeded: bool = False
    ) -> bool:
        """See :meth:`Ledger.release`."""
        rows = self._rows().filter(key=key).exclude(state=KeyState.RELEASED)
        if keep_succeeded:
            rows = rows.exclude(state=KeyState.SUCCEEDED)
        if task_id is not None:
            rows = rows.filter(task_id=task_id)
        return bool(rows.update(state=KeyState.RELEASED, updated_at=timezone.now()))

    def get(self, key: str) -> dict[str, Any] | None:
        """See :meth:`Ledger.get`."""
        row: dict[str, Any] | None = self._rows().filter(key=key).values().first()
        return row

    def get_many(self, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        """See :meth:`Ledger.get_many`: one query per :data:`BULK` keys."""
        found: dict[str, dict[str, Any]] = {}
        for start in range(0, len(keys), BULK):
            for row in self._rows().filter(key__in=keys[start : start + BULK]).values():
                found[row["key"]] = row
        return found

    def purge(self, retention: float) -> int:
        """See :meth:`Ledger.purge`."""
        now = timezone.now()
        old = self._rows().filter(expires_at__lt=now - dt.timedelta(seconds=retention))
        deleted, _ = old.exclude(state=KeyState.RUNNING, lease_expires_at__gt=now).delete()
        return int(deleted)


# Shared by the scripts: the server's clock (one clock for every producer and worker), and
