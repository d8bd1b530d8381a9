"""The idempotency guard: publish a key once (producer side), run its body once (worker side).

The decisions are taken by a :class:`~celery_guard.idempotency.ledger.Ledger`; this module
applies the outcomes: publish or not, run the body or not. See ``docs/idempotency.md``.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import socket
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from celery.exceptions import Retry
from django.db import transaction
from django.utils import timezone

from celery_guard import conf
from celery_guard.conf import guard_settings
from celery_guard.core import checks as core_checks
from celery_guard.core import headers
from celery_guard.exceptions import IdempotencyConflict, LeaseLost
from celery_guard.idempotency import ledger
from celery_guard.idempotency.keys import Identity, identify
from celery_guard.idempotency.models import KeyState
from celery_guard.observability import events

logger = logging.getLogger(__name__)


@dataclass
class RunContext:
    """What a running task knows about its idempotency key: ``self.guard`` in the body.

    Attributes:
        key: The key of this run, or ``None`` when the task has none.
        fencing_token: Incremented by every start or takeover of the key; pass it to
            downstream writes so they can reject a stale attempt (a lower token).
        owner: Identifies this attempt in the ledger.
    """

    key: str | None = None
    fencing_token: int | None = None
    owner: str | None = None
    task_id: str | None = None
    store: ledger.Ledger | None = field(default=None, repr=False)
    completed: bool = False
    #: The key had already succeeded: this delivery did not run the body.
    skipped: bool = False
    #: Set when the body was skipped because the key already succeeded: the task id of the
    #: run that succeeded (this task's own id when an earlier delivery of it did).
    skipped_for: str | None = None

    def renew(self, lease: float | None = None) -> None:
        """Extend this run's lease, for a body that may outlive it (call it periodically).

        Args:
            lease: Seconds from now; defaults to ``CELERY_GUARD_IDEMPOTENCY_LEASE``.

        Raises:
            LeaseLost: The lease already expired or the key was taken over: stop working.
        """
        if self.key is None or self.owner is None or self.store is None:
            return
        assert self.fencing_token is not None
        seconds = guard_settings.idempotency_lease if lease is None else lease
        if not self.store.renew(
            self.key, owner=self.owner, token=self.fencing_token, lease=seconds
        ):
            logger.warning(
                "celery_guard: %s cannot renew key %r (token %s): lease lost",
                self.task_id,
                self.key,
                self.fencing_token,
            )
            raise LeaseLost(f"idempotency key {self.key!r}: the lease was lost")

    @contextlib.contextmanager
    def atomic(self, using: str | None = None) -> Iterator[None]:
        """A ``transaction.atomic()`` block that also marks the key succeeded in it.

        The effect written inside the block and the ledger's ``succeeded`` commit together
        or roll back together: the one exactly-once path for the effect. Without a key this
        is a plain ``transaction.atomic()``.

        Raises:
            LeaseLost: Another attempt took the key over; the block is rolled back.
            TypeError: The ledger is not the database ledger.
        """
        if self.key is None or self.owner is None or self.store is None:
            with transaction.atomic(using=using):
                yield
            return
        if not isinstance(self.store, ledger.DatabaseLedger):
            raise TypeError(
                "self.guard.atomic() needs CELERY_GUARD_IDEMPOTENCY_BACKEND = 'database': "
                "the effect and the ledger must share one database transaction"
            )
        alias = using or self.store.using()
        if alias != self.store.using():
            raise TypeError(f"the ledger is in database {self.store.using()!r}, not {alias!r}")
        assert self.fencing_token is not None
        with transaction.atomic(using=alias):
            yield
            done = self.store.finish(
                self.key, owner=self.owner, token=self.fencing_token, state=KeyState.SUCCEEDED
            )
            if not done:
                logger.warning(
                    "celery_guard: %s lost key %r (token %s) before completing; rolling back",
                    self.task_id,
                    self.key,
                    self.fencing_token,
                )
                raise LeaseLost(f"idempotency key {self.key!r} was taken over; rolled back")
        self.completed = True
        logger.info(
            "celery_guard: %s completed key %r in its transaction (token %s)",
            self.task_id,
            self.key,
            self.fencing_token,
        )


_CONTEXT_ATTR = "celery_guard_run"
#: Request attribute the failure pipeline sets on a redelivery after a lost worker.
LOST_ATTR = "celery_guard_lost"


def context(request: Any) -> RunContext:
    """Return the run context of a task request (an empty one outside a guarded run)."""
    ctx = getattr(request, _CONTEXT_ATTR, None)
    return ctx if isinstance(ctx, RunContext) else RunContext()


def mark_skipped(request: Any) -> None:
    """Record on ``request`` that it ended as a skip of a key that already succeeded."""
    ctx = getattr(request, _CONTEXT_ATTR, None)
    if not isinstance(ctx, RunContext):
        ctx = RunContext(task_id=getattr(request, "id", None))
        setattr(request, _CONTEXT_ATTR, ctx)
    ctx.skipped = True


@dataclass
class _Batch:
    """The keys a :func:`claimed_together` block claimed, and those published since."""

    claimed: set[tuple[str, str]]
    published: list[tuple[str, str]] = field(default_factory=list)

    def holds(self, key: str, task_id: str) -> bool:
        return (key, task_id) in self.claimed


_BATCH: contextvars.ContextVar[_Batch | None] = contextvars.ContextVar(
    "celery_guard_claim_batch", default=None
)


@contextlib.contextmanager
def claimed_together(
    task: Any, calls: Sequence[tuple[str, Identity | None]], delay: float = 0.0
) -> Iterator[dict[str, ledger.Claim]]:
    """Claim the keys of many calls of ``task`` in one ledger operation, then publish them.

    For a publisher of many calls (a bulk run's chunk): one :meth:`Ledger.claim_many`
    instead of a claim per call, and one :meth:`Ledger.confirm_many` at the end of the block
    for the calls published in it. Inside the block, the publish of a call claimed here
    (``task.apply_async(task_id=...)``, through :func:`publish_once`) skips its own claim; a
    publish that raises gives its key back, and so does the end of the block for a claimed
    call that was not published. A key twice in ``calls`` is claimed by its first call; the
    later ones are duplicates of it (or conflicts, with other arguments).

    Args:
        task: The guarded task of every call.
        calls: ``(task id, identity)`` of each call; calls without a key are left out.
        delay: The calls' countdown, if any (see :func:`start_within`).

    Yields:
        The claim of each call with a key, by task id: :func:`note_claim` tells whether to
        publish it (and logs the outcome).
    """
    store = ledger.get_ledger()
    first: dict[str, tuple[str, Identity]] = {}
    for task_id, identity in calls:
        if identity is not None:
            first.setdefault(identity.key, (task_id, identity))
    news = [
        ledger.NewClaim(identity.key, task_id, identity.fingerprint, identity.window)
        for task_id, identity in first.values()
    ]
    decided = store.claim_many(news, task_name=task.name) if news else []
    by_key = {new.key: claim for new, claim in zip(news, decided, strict=True)}
    claims: dict[str, ledger.Claim] = {}
    for task_id, identity in calls:
        if identity is None:
            continue
        claim = by_key[identity.key]
        if first[identity.key][0] != task_id:
            # The same key again in this batch: held by its first call (claimed or not).
            same = claim.fingerprint == identity.fingerprint
            claim = ledger.Claim(
                "duplicate" if same else "conflict", claim.task_id, claim.fingerprint
            )
        claims[task_id] = claim
    batch = _Batch({(k, c.task_id) for k, c in by_key.items() if c.outcome == "claimed"})
    token = _BATCH.set(batch)
    try:
        yield claims
    finally:
        _BATCH.reset(token)
        done = set(batch.published)
        for key, task_id in batch.claimed - done:
            _quietly(store.unclaim, key, task_id)
        if batch.published:
            within = start_within(task, delay)
            try:
                store.confirm_many(batch.published, within)
            except Exception:
                logger.warning(
                    "celery_guard: %d publish(es) of %s out, but their claims could not be "
                    "confirmed; after the publish grace another enqueue may publish those "
                    "keys again",
                    len(batch.published),
                    task.name,
                    exc_info=True,
                )


def _quietly(action: Callable[..., Any], *args: Any) -> None:
    try:
        action(*args)
    except Exception:
        logger.warning("celery_guard: %s%r failed", getattr(action, "__name__", action), args)


def publish_once(
    task: Any,
    identity: Identity | None,
    task_id: str,
    publish: Callable[[], Any],
    delay: float = 0.0,
) -> Any:
    """Publish a call unless its key is already held inside its window.

    The key is claimed before the publish and released if the publish raises, so a failed
    publish leaves no claim behind. The claim is provisional until the publish is confirmed
    after it returns: a producer that dies in between leaves a claim that the next enqueue
    takes over once ``CELERY_GUARD_IDEMPOTENCY_PUBLISH_GRACE`` has passed, so the job is not
    lost. The confirmed claim must start within :func:`start_within` (``delay``, the
    message's countdown/ETA, plus the visibility timeout and the start grace), or the next
    enqueue takes it over as never started: its message was lost. A republish of the
    running task itself (a Celery retry) gives its lease back instead, so the next attempt
    can run.

    Returns:
        The ``AsyncResult`` of the publish, or of the first task when this is a duplicate;
        its ``deduplicated`` attribute says which (``True``: nothing was published).

    Raises:
        IdempotencyConflict: The key is held by a call with other arguments.
    """
    if identity is None:
        return _deduplicated(publish(), False)
    store = ledger.get_ledger()
    request = task.request
    ctx = context(request)
    if task_id == request.id and ctx.key == identity.key:
        if ctx.owner is not None and ctx.fencing_token is not None:
            store.yield_lease(identity.key, owner=ctx.owner, token=ctx.fencing_token)
            logger.info("celery_guard: %s gives key %r back for its retry", task_id, ctx.key)
        return _deduplicated(publish(), False)
    batch = _BATCH.get()
    if batch is not None and batch.holds(identity.key, task_id):
        # Claimed with the other calls of a batch (claimed_together): publish, confirmed there.
        result = _publish_claimed(store, task, identity.key, task_id, publish)
        batch.published.append((identity.key, task_id))
        return _deduplicated(result, False)
    claim = store.claim(
        identity.key,
        task_name=task.name,
        task_id=task_id,
        fingerprint=identity.fingerprint,
        window=identity.window,
    )
    if not note_claim(task, identity, task_id, claim):
        return _deduplicated(task.AsyncResult(claim.task_id), True)
    result = _publish_claimed(store, task, identity.key, task_id, publish)
    _confirm(store, task, identity.key, task_id, start_within(task, delay))
    return _deduplicated(result, False)


def _publish_claimed(
    store: ledger.Ledger, task: Any, key: str, task_id: str, publish: Callable[[], Any]
) -> Any:
    """Publish a call whose key it claimed; a publish that raises gives the claim back."""
    try:
        return publish()
    except BaseException:
        store.unclaim(key, task_id)
        logger.warning(
            "celery_guard: publish of %s[%s] failed; key %r released", task.name, task_id, key
        )
        raise


def note_claim(task: Any, identity: Identity, task_id: str, claim: ledger.Claim) -> bool:
    """Log (and emit) the outcome of an enqueue claim; True when the call may publish.

    Raises:
        IdempotencyConflict: Other arguments hold the key and the call's ``on_conflict``
            is ``raise``.
    """
    if claim.outcome == "conflict" and identity.on_conflict == "raise":
        logger.warning(
            "celery_guard: refused %s: key %r is held by %s with other arguments",
            task.name,
            identity.key,
            claim.task_id,
        )
        raise IdempotencyConflict(
            f"{task.name}: idempotency key {identity.key!r} is already used by task "
            f"{claim.task_id} with other arguments (inside its dedup window)",
            key=identity.key,
            task_id=claim.task_id,
        )
    if claim.outcome != "claimed":
        events.emit(
            "deduplicated",
            task_id=task_id,
            task_name=task.name,
            queue=None,
            attempt=None,
            where="enqueue",
            idempotency_key_hash=events.key_hash(identity.key),
            held_by=claim.task_id,
            state=claim.outcome,
        )
        logger.info(
            "celery_guard: %s not published: key %r is held by %s (%s)",
            task.name,
            identity.key,
            claim.task_id,
            claim.outcome,
        )
        return False
    if claim.never_started:
        logger.warning(
            "celery_guard: %s[%s] took key %r over from %s, which was published but never "
            "started by its start-by time (its message was lost by the broker, or waited in "
            "the queue longer than CELERY_GUARD_IDEMPOTENCY_START_GRACE)",
            task.name,
            task_id,
            identity.key,
            claim.abandoned,
        )
    elif claim.abandoned:
        logger.warning(
            "celery_guard: %s[%s] took key %r over from %s, whose publish was never "
            "confirmed (its producer died between the claim and the publish, or the publish "
            "outlasted CELERY_GUARD_IDEMPOTENCY_PUBLISH_GRACE)",
            task.name,
            task_id,
            identity.key,
            claim.abandoned,
        )
    else:
        logger.info("celery_guard: %s[%s] claimed key %r", task.name, task_id, identity.key)
    return True


def _deduplicated(result: Any, duplicate: bool) -> Any:
    """Mark ``result``: True when the call was a duplicate and published nothing."""
    result.deduplicated = duplicate
    return result


def start_within(task: Any, delay: float) -> float:
    """Seconds a published message may take to start before its claim counts as lost.

    Its countdown/ETA ``delay``, plus the Redis visibility timeout (a message a dead consumer
    held comes back only after it; RabbitMQ returns it when the channel closes), plus
    ``CELERY_GUARD_IDEMPOTENCY_START_GRACE`` for the queue wait.
    """
    app = task.app
    # Two Celery configuration lookups cost more than the rest of a confirm: kept per app
    # with the settings cache (a transport option assigned to app.conf at run time is not
    # seen, as for the ledger's broker URL).
    visibility = conf.memo(
        ("redis_visibility_timeout", app), lambda: core_checks.redis_visibility_timeout(app)
    )
    return delay + (visibility or 0.0) + guard_settings.idempotency_start_grace


def _confirm(store: ledger.Ledger, task: Any, key: str, task_id: str, within: float) -> None:
    """Confirm a published claim; never raises, since the message is out already.

    An unconfirmed claim only means that, after the grace, another enqueue may publish the
    key again: a duplicate message that the worker-side guard runs at most once.
    """
    try:
        # Not waited for where the ledger can help it: nothing here depends on the answer.
        confirmed = store.confirm(key, task_id, within, wait=False)
    except Exception:
        logger.warning(
            "celery_guard: %s[%s] published but its claim of key %r could not be confirmed; "
            "after the publish grace another enqueue may publish the key again",
            task.name,
            task_id,
            key,
            exc_info=True,
        )
        return
    if not confirmed:
        # Not an error when a worker already started the task (state running or later);
        # the record tells whether the key was taken over instead.
        logger.info(
            "celery_guard: %s[%s] published; key %r was no longer an unconfirmed claim of it "
            "(started already, or taken over)",
            task.name,
            task_id,
            key,
        )


def _owner(request: Any) -> str:
    host = getattr(request, "hostname", None) or socket.gethostname()
    # Eight random hex characters, as uuid4().hex[:8] gave, for a fifth of its cost.
    return f"{host}:{os.getpid()}:{os.urandom(4).hex()}"


def run_guarded(
    task: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    call: Callable[[], Any],
    request: Any,
    guard: Mapping[str, Any],
) -> Any:
    """Run a task body under its key's lease (worker side); see ``docs/idempotency.md``.

    A key that already succeeded is not run again; a key whose lease is held by a live
    owner is retried after the lease; otherwise this attempt takes the lease (a takeover
    when the previous owner's lease expired), runs the body and marks the key succeeded, or
    failed if the body raises (a Celery retry gives the lease back instead).

    Args:
        task: The guarded task.
        args: Positional arguments of the body (a key is derived from them when the
            message carries none).
        kwargs: Keyword arguments of the body.
        call: Runs the steps inside and the body (its arguments bound in it).
        request: ``task.request`` of the delivery.
        guard: The guard header of the delivery.
    """
    if request.called_directly:
        return call()
    identity = Identity.from_header(guard)
    if identity is None:
        identity = identify(task, args, kwargs, {})
    if identity is None:
        return call()
    store = ledger.get_ledger()
    owner = _owner(request)
    lease = max(guard_settings.idempotency_lease, float(task.time_limit or 0))
    start = store.start(
        identity.key,
        task_name=task.name,
        task_id=request.id,
        fingerprint=identity.fingerprint,
        window=identity.window,
        owner=owner,
        lease=lease,
        # Its own previous delivery died holding the key: waiting out that lease is useless.
        reclaim=bool(getattr(request, LOST_ATTR, 0)),
    )
    ctx = RunContext(key=identity.key, task_id=request.id, store=store)
    setattr(request, _CONTEXT_ATTR, ctx)
    if start.outcome == "skip":
        ctx.skipped = True
        ctx.skipped_for = start.task_id or ""
        events.emit(
            "deduplicated",
            where="run",
            idempotency_key_hash=events.key_hash(identity.key),
            held_by=start.task_id,
            state="succeeded",
        )
        logger.info(
            "celery_guard: %s[%s] skipped: key %r already succeeded (task %s)",
            task.name,
            request.id,
            identity.key,
            start.task_id,
        )
        return None
    if start.outcome == "busy":
        events.emit(
            "key_busy",
            idempotency_key_hash=events.key_hash(identity.key),
            held_by=start.task_id,
            retry_in=start.retry_in,
        )
        logger.info(
            "celery_guard: %s[%s]: key %r is running in %s; retrying in %.1fs",
            task.name,
            request.id,
            identity.key,
            start.task_id,
            start.retry_in,
        )
        # Republished as it is (not counted as a retry: the body did not run), once the
        # holder's lease has ended; the holder's outcome decides what happens then.
        wait = max(start.retry_in, 0.1)
        reason = f"key {identity.key!r} is running elsewhere"
        if request.is_eager:  # task.apply(): nothing to republish, the caller sees RETRY
            raise Retry(reason, when=wait)
        again = task.signature_from_request(request, countdown=wait, retries=request.retries)
        again.apply_async()
        raise Retry(reason, when=wait, sig=again)
    ctx.owner, ctx.fencing_token = owner, start.fencing_token
    logger.info(
        "celery_guard: %s[%s] runs key %r with fencing token %s",
        task.name,
        request.id,
        identity.key,
        start.fencing_token,
    )
    try:
        result = call()
    except Retry:
        raise
    except BaseException:
        if not ctx.completed:
            store.finish(
                identity.key, owner=owner, token=start.fencing_token, state=KeyState.FAILED
            )
            logger.info("celery_guard: %s[%s] key %r failed", task.name, request.id, identity.key)
        raise
    if not ctx.completed:
        if store.finish(
            identity.key, owner=owner, token=start.fencing_token, state=KeyState.SUCCEEDED
        ):
            logger.info(
                "celery_guard: %s[%s] key %r succeeded", task.name, request.id, identity.key
            )
        else:
            logger.warning(
                "celery_guard: %s[%s] finished but key %r was taken over meanwhile "
                "(token %s is stale); the effect may have happened twice",
                task.name,
                request.id,
                identity.key,
                start.fencing_token,
            )
    return result


def succeeded(task: Any) -> bool:
    """Whether the key of ``task``'s running request already succeeded, inside its window.

    Asked before the guard would dead-letter a delivery: a job whose effect committed is
    never turned into a dead letter, whatever happened to its message since.
    """
    request = task.request
    ctx = context(request)
    if ctx.completed:
        return True
    identity = Identity.from_header(headers.read(getattr(request, "headers", None)))
    if identity is None:
        identity = identify(task, request.args, request.kwargs, {})
    if identity is None:
        return False
    record = ledger.get_ledger().get(identity.key)
    if record is None or record["state"] != KeyState.SUCCEEDED:
        return False
    expires = record.get("expires_at")
    return expires is None or expires > timezone.now()


def release(key: str, task_id: str | None = None, *, keep_succeeded: bool = False) -> bool:
    """Free ``key`` so a new call can run (only while ``task_id`` holds it, when given).

    With ``keep_succeeded`` a key that succeeded is kept: its effect committed, and a
    resubmission or replay of it must stay a skip.
    """
    released = ledger.get_ledger().release(key, task_id, keep_succeeded=keep_succeeded)
    logger.info("celery_guard: key %r %s", key, "released" if released else "not held")
    return released


def purge() -> int:
    """Delete ledger records past their window and the retention; return how many."""
    deleted = ledger.get_ledger().purge(guard_settings.idempotency_retention)
    logger.info("celery_guard: purged %d expired idempotency records", deleted)
    return deleted
