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

A confirmed claim gets a *start-by* time instead: the publish plus the message's
countdown/ETA, the Redis visibility timeout and ``CELERY_GUARD_IDEMPOTENCY_START_GRACE``. A
confirmed claim that no worker started by then is *claimed, never started*: its message was
lost by the broker (Redis without persistence restarted, a consumer killed between taking
the message and recording it unacked), and the next claim takes the key over, so a lost
message blocks a resubmission for a bounded time, not for the whole window.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from celery_guard.conf import guard_settings


@dataclass(frozen=True)
class Claim:
    """Outcome of an enqueue-time claim.

    Attributes:
        outcome: ``"claimed"`` (publish), ``"duplicate"`` (same arguments, publish nothing)
            or ``"conflict"`` (other arguments hold the key).
        task_id: The task that holds the key (the caller's own id when claimed).
        fingerprint: The fingerprint of the arguments that hold the key.
        abandoned: When claimed by taking over an abandoned claim (unconfirmed past its
            publish deadline, or confirmed but never started by its start-by time), the
            task id of that claim; else ``""``.
        never_started: The abandoned claim was confirmed (published) but never started.
    """

    outcome: str
    task_id: str
    fingerprint: str
    abandoned: str = ""
    never_started: bool = False


@dataclass(frozen=True)
class NewClaim:
    """One key of :meth:`Ledger.claim_many`: the call that claims it.

    Attributes:
        key: The idempotency key (distinct within one ``claim_many``).
        task_id: The task id of the call's message.
        fingerprint: The fingerprint of the call's arguments.
        window: The dedup window, in seconds.
    """

    key: str
    task_id: str
    fingerprint: str
    window: float


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
        lease), claimed but unconfirmed past its publish deadline, or confirmed but never
        started past its start-by time (both abandoned). A key already held by ``task_id``
        itself counts as claimed.
        """

    @abc.abstractmethod
    def confirm(
        self, key: str, task_id: str, start_within: float | None = None, *, wait: bool = True
    ) -> bool:
        """Confirm the publish of ``task_id``'s claim: clear its publish deadline.

        The claim must then start within ``start_within`` seconds (default
        ``CELERY_GUARD_IDEMPOTENCY_START_GRACE``; the producer adds the countdown/ETA and
        the visibility timeout), or a later claim takes it over as never started. Only an
        unconfirmed ``pending`` claim of ``task_id`` changes; ``False`` when the key was
        taken over, or a worker already started the task (its state stands).

        With ``wait=False`` a backend may send the confirmation without waiting for its
        answer (then it returns ``True``: sent): the enqueue does not need the answer, only
        a log line. The Redis ledger does so when its server can skip a reply.
        """

    def claim_many(
        self, claims: Sequence[NewClaim], *, task_name: str, grace: float | None = None
    ) -> list[Claim]:
        """Claim many keys of ``task_name`` at once: :meth:`claim` of each, in order.

        For a publisher of many calls (a bulk run): a backend overrides it with one round
        trip (or one statement) per call of it instead of one per key. The keys must be
        distinct; each answer is what :meth:`claim` of that key would have answered.
        """
        return [
            self.claim(
                c.key,
                task_name=task_name,
                task_id=c.task_id,
                fingerprint=c.fingerprint,
                window=c.window,
                grace=grace,
            )
            for c in claims
        ]

    def confirm_many(
        self, published: Sequence[tuple[str, str]], start_within: float | None = None
    ) -> int:
        """:meth:`confirm` of many ``(key, task_id)`` claims at once; return how many changed."""
        return sum(self.confirm(key, task_id, start_within) for key, task_id in published)

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
        reclaim: bool = False,
    ) -> Start:
        """Take the lease of ``key`` for a run, incrementing its fencing token.

        Taken when the key is absent, pending, failed, released, running under an expired
        lease (a takeover), or succeeded but past its window. With ``reclaim`` (a redelivery
        after its own worker was lost) also when ``task_id`` itself holds it running, whatever
        its lease.
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
    def release(
        self, key: str, task_id: str | None = None, *, keep_succeeded: bool = False
    ) -> bool:
        """Free ``key`` (only while ``task_id`` holds it, when given).

        With ``keep_succeeded`` a key that succeeded stays as it is: its effect committed.
        """

    @abc.abstractmethod
    def get(self, key: str) -> dict[str, Any] | None:
        """Return the record of ``key`` as a dict, or ``None``."""

    def get_many(self, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The records of those ``keys`` that exist, by key (:meth:`get` of each, at once)."""
        records = {key: self.get(key) for key in keys}
        return {key: record for key, record in records.items() if record is not None}

    @abc.abstractmethod
    def purge(self, retention: float) -> int:
        """Delete records whose window ended more than ``retention`` seconds ago."""


def start_bound(seconds: float | None) -> float:
    """How long a confirmed claim may wait for its start: ``seconds``, or the start grace."""
    return guard_settings.idempotency_start_grace if seconds is None else seconds


def publish_grace(grace: float | None) -> float:
    """The publish grace of a claim: ``grace``, or ``CELERY_GUARD_IDEMPOTENCY_PUBLISH_GRACE``."""
    return guard_settings.idempotency_publish_grace if grace is None else grace
