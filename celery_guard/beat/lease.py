"""The beat leadership lease: atomic database operations and the holder's state machine."""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from django.db import Error, IntegrityError, connection, transaction
from django.db.models import Case, DateTimeField, ExpressionWrapper, F, Q, Value, When
from django.db.models.functions import Now

from celery_guard import signals
from celery_guard.beat.models import BeatLease
from celery_guard.observability import events, providers

logger = logging.getLogger(__name__)


def make_identity() -> str:
    """Return a holder identity unique to this scheduler instance: ``host:pid:uuid``."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


def _expiry(ttl: float) -> ExpressionWrapper[Any]:
    # Database time on both sides of every comparison: beats on hosts with skewed clocks
    # still agree on when a lease has expired.
    return ExpressionWrapper(Now() + Value(timedelta(seconds=ttl)), output_field=DateTimeField())


@dataclass(frozen=True)
class LeaseRecord:
    """The lease row as one attempt left it."""

    held: bool
    holder: str
    token: int
    expires_at: datetime | None


def acquire_or_renew(name: str, holder: str, ttl: float) -> LeaseRecord:
    """Take or extend the lease ``name`` for ``holder`` if it is ours or has expired.

    One conditional ``UPDATE ... WHERE holder = me OR expires_at < now()`` decides; the
    first acquisition of a lock name inserts the row, and losing that insert race to another
    beat is a normal "not held". The fencing token grows whenever the holder changes.

    Returns:
        The row after the attempt; ``held`` tells whether ``holder`` now holds it.
    """
    with transaction.atomic():
        updated = (
            BeatLease.objects.filter(name=name)
            .filter(Q(holder=holder) | Q(expires_at__lt=Now()))
            .update(
                token=Case(When(holder=holder, then=F("token")), default=F("token") + 1),
                acquired_at=Case(When(holder=holder, then=F("acquired_at")), default=Now()),
                holder=holder,
                renewed_at=Now(),
                expires_at=_expiry(ttl),
            )
        )
        if not updated and not BeatLease.objects.filter(name=name).exists():
            try:
                with transaction.atomic():
                    BeatLease.objects.create(
                        name=name,
                        holder=holder,
                        token=1,
                        acquired_at=Now(),
                        renewed_at=Now(),
                        expires_at=_expiry(ttl),
                    )
                    updated = 1
            except IntegrityError:
                pass  # another beat inserted it first: it holds the lease
        row = BeatLease.objects.filter(name=name).values("holder", "token", "expires_at").first()
    if row is None:  # pragma: no cover - deleted by hand between our statements
        return LeaseRecord(False, "", 0, None)
    return LeaseRecord(
        held=bool(updated) and row["holder"] == holder,
        holder=row["holder"],
        token=row["token"],
        expires_at=row["expires_at"],
    )


def fence(name: str, holder: str, token: int, ttl: float) -> bool:
    """Confirm and extend the lease inside the caller's transaction (the fencing check).

    Matches only while ``holder`` still holds the unexpired lease of term ``token``; on
    PostgreSQL the row lock it takes also makes a takeover wait for the caller's commit.
    """
    updated: int = BeatLease.objects.filter(
        name=name, holder=holder, token=token, expires_at__gt=Now()
    ).update(renewed_at=Now(), expires_at=_expiry(ttl))
    return updated == 1


def release(name: str, holder: str) -> bool:
    """Expire the lease now if ``holder`` holds it, so a standby takes over on its next tick."""
    updated: int = BeatLease.objects.filter(name=name, holder=holder).update(
        expires_at=Now(), renewed_at=Now()
    )
    return updated == 1


def drop_connection() -> None:
    """Close this thread's database connection after an error, so the next use reconnects."""
    with contextlib.suppress(Exception):
        connection.close()


def on_new_connection(operation: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Run a database operation in a new thread (so on a new connection); False on failure.

    Django's connections are per thread; a thread of its own is the one way to get a fresh
    connection while this thread's is stuck in a broken transaction.
    """
    outcome: list[bool] = []

    def work() -> None:
        try:
            outcome.append(operation())
        except Exception as exc:
            logger.warning("celery_guard: beat lease: retry on a new connection failed: %r", exc)
        finally:
            drop_connection()

    thread = threading.Thread(target=work, name="celery-guard-lease-release", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(outcome and outcome[0])


class Store(Protocol):
    """The database operations the lease state machine needs (a fake in unit tests)."""

    def acquire_or_renew(self, name: str, holder: str, ttl: float) -> LeaseRecord: ...

    def release(self, name: str, holder: str) -> bool: ...


class DatabaseStore:
    """The real store: the functions above."""

    def acquire_or_renew(self, name: str, holder: str, ttl: float) -> LeaseRecord:
        """See :func:`acquire_or_renew`."""
        return acquire_or_renew(name, holder, ttl)

    def release(self, name: str, holder: str) -> bool:
        """See :func:`release`."""
        return release(name, holder)


class Event(enum.Enum):
    """What one :meth:`Lease.step` did."""

    ACQUIRED = "acquired"  #: we became the leader (a new term: reload state before dispatching)
    RENEWED = "renewed"  #: we were and still are the leader
    HELD = "held"  #: leader, renewal not due yet (no query made)
    LOST = "lost"  #: we were the leader and are not any more
    STANDBY = "standby"  #: someone else leads
    ERROR = "error"  #: the database could not be asked; leadership unconfirmed


class Lease:
    """One beat's view of the lease: when to renew, whether it may dispatch right now.

    The local deadline is measured on the monotonic clock from *before* the renewing query,
    so it ends no later than the database's ``expires_at``: a leader that cannot renew stops
    dispatching before anybody else can take over.

    Args:
        name: The lock name (``CELERY_GUARD_BEAT_LOCK_NAME``).
        ttl: Lease seconds (``CELERY_GUARD_BEAT_LEASE_SECONDS``).
        renew_every: Seconds between renewals while leading (at most ``ttl / 3``).
        store: Database operations; :class:`DatabaseStore` unless testing.
        identity: Holder identity; a fresh ``host:pid:uuid`` by default.
        clock: Monotonic clock.
        sender: Sender of the ``lease_acquired`` / ``lease_lost`` signals.
    """

    def __init__(
        self,
        name: str,
        ttl: float,
        *,
        renew_every: float | None = None,
        store: Store | None = None,
        identity: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        sender: Any = None,
    ) -> None:
        self.name = name
        self.ttl = float(ttl)
        self.renew_every = min(renew_every or self.ttl / 3, self.ttl / 3)
        self.store: Store = store or DatabaseStore()
        self.identity = identity or make_identity()
        self.clock = clock
        self.sender = sender if sender is not None else self
        self.held = False
        self.token: int | None = None
        self.deadline = 0.0
        self.renew_at = 0.0

    def valid(self) -> bool:
        """Whether we hold the lease and its local deadline has not passed."""
        return self.held and self.clock() < self.deadline

    def seconds_until_renewal(self) -> float:
        """Seconds until the leader should renew (0 when due)."""
        return max(0.0, self.renew_at - self.clock())

    def extended(self, started: float) -> None:
        """Record a renewal made elsewhere (a claim's fencing update) begun at ``started``."""
        if self.held:
            self.deadline = max(self.deadline, started + self.ttl)

    def step(self) -> Event:
        """Acquire, renew or observe the lease, once per scheduler tick."""
        started = self.clock()
        if self.held and started < self.renew_at and started < self.deadline:
            return Event.HELD
        try:
            record = self.store.acquire_or_renew(self.name, self.identity, self.ttl)
        except Error as exc:
            drop_connection()
            if self.held and self.clock() >= self.deadline:
                self._lose(f"could not renew: {exc!r}")
                return Event.LOST
            logger.warning(
                "celery_guard: beat lease %r: database error, leadership unconfirmed: %r",
                self.name,
                exc,
            )
            return Event.ERROR
        if not record.held:
            if self.held:
                self._lose(f"taken by {record.holder} (token {record.token})")
                return Event.LOST
            return Event.STANDBY
        was_held, old_token = self.held, self.token
        self.held, self.token = True, record.token
        self.deadline = started + self.ttl
        self.renew_at = started + self.renew_every
        if was_held and old_token == record.token:
            return Event.RENEWED
        if was_held:  # lost and retaken unnoticed in between: a new term all the same
            self._announce_lost(old_token, "a new term began")
        logger.warning(
            "celery_guard: beat lease %r acquired by %s (token %s, expires %s)",
            self.name,
            self.identity,
            record.token,
            record.expires_at,
        )
        signals.lease_acquired.send(
            sender=self.sender, lock_name=self.name, holder=self.identity, token=record.token
        )
        events.emit("lease_acquired", lock=self.name, holder=self.identity, token=record.token)
        return Event.ACQUIRED

    def lost(self, reason: str) -> None:
        """Give up leadership after learning elsewhere that we no longer hold the lease."""
        if self.held:
            self._lose(reason)

    def release(self) -> None:
        """Release the lease on shutdown (expire it so a standby takes over at once)."""
        if not self.held:
            return
        token = self.token
        self.held = False
        released = False
        try:
            released = self.store.release(self.name, self.identity)
        except Error as exc:
            # The connection died since the last tick (a database restart), or the shutdown
            # signal interrupted a query inside a transaction, which leaves this thread's
            # connection unusable even after close(): the second try runs on a new one.
            logger.warning("celery_guard: beat lease %r: release failed: %r", self.name, exc)
            drop_connection()
            released = on_new_connection(lambda: self.store.release(self.name, self.identity))
        self._announce_lost(token, "released on shutdown" if released else "release failed")

    def _lose(self, reason: str) -> None:
        token = self.token
        self.held = False
        self.deadline = 0.0
        self._announce_lost(token, reason)

    def _announce_lost(self, token: int | None, reason: str) -> None:
        logger.warning(
            "celery_guard: beat lease %r lost by %s (token %s): %s",
            self.name,
            self.identity,
            token,
            reason,
        )
        events.emit("lease_lost", lock=self.name, holder=self.identity, why=reason)
        signals.lease_lost.send(
            sender=self.sender,
            lock_name=self.name,
            holder=self.identity,
            token=token,
            reason=reason,
        )


def leaders() -> list[providers.Leader]:
    """Every beat lock and its holder (``None`` once the lease expired)."""
    found = []
    for row in BeatLease.objects.annotate(live=Q(expires_at__gt=Now())).order_by("name"):
        live = bool(row.live) and bool(row.holder)
        found.append(providers.Leader(row.name, row.holder if live else None, row.token))
    return found
