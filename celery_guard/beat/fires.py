"""Beat fire records: claiming a slot before publishing, and the worker-side run status.

A slot is claimed in one transaction that (1) confirms and extends the lease of the
claiming leader (fencing), (2) moves the entry's ``last_run_at`` forward to the slot only if
it is still behind it, (3) inserts the unique ``(entry, slot)`` fire row and (4), for a fired
slot, writes the message as an outbox row (``celery_guard.delivery``). Any of the first three
failing means: publish nothing. The committed outbox row is what gets published: by the beat
at once, or by the delivery poller if the beat died first.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from celery import states
from django.db import IntegrityError, transaction
from django.db.models import F, Q
from django.utils import timezone

from celery_guard.beat import lease, slots
from celery_guard.beat.models import BeatFire, FireStatus
from celery_guard.core import headers
from celery_guard.delivery import services as delivery
from celery_guard.delivery.models import OutboxMessage

logger = logging.getLogger(__name__)


class Outcome(enum.Enum):
    """Result of a claim."""

    FIRED = "fired"  #: the slot is ours: publish it
    SKIPPED = "skipped"  #: recorded as skipped (overlap policy): publish nothing
    MISSED = "missed"  #: recorded as missed (catch-up policy): publish nothing
    TAKEN = "taken"  #: the slot already has a fire row: publish nothing
    STALE = "stale"  #: the entry's last run is already at or past the slot: publish nothing
    LOST = "lost"  #: our lease term is over: publish nothing


@dataclass(frozen=True)
class Message:
    """What a fired slot publishes, written as an outbox row in the claim's transaction."""

    args: Any
    kwargs: Any
    #: Celery options, without ``task_id``, ``headers`` and ``guard``.
    options: Mapping[str, Any]
    headers: Mapping[str, Any]
    #: Per-call guard options (a guarded task: the slot's idempotency key).
    guard: Mapping[str, Any]
    #: Unguarded task: published with ``send_task`` as it is.
    prepared: bool


@dataclass(frozen=True)
class Claim:
    """One slot claim by the leader."""

    lock_name: str
    holder: str
    token: int
    ttl: float
    entry: str
    periodic_task_id: int
    task: str
    task_id: str
    plan: slots.Plan
    policy: slots.EntryPolicy
    #: The message of a fired slot; ``None``: write no outbox row (the caller publishes).
    message: Message | None = None


class _Abort(Exception):
    def __init__(self, outcome: Outcome) -> None:
        self.outcome = outcome


def _previous_run_active(claim: Claim, now: datetime) -> bool:
    since = now - timedelta(seconds=claim.policy.overlap_timeout)
    return bool(
        BeatFire.objects.filter(
            entry=claim.entry,
            status=FireStatus.FIRED,
            finished_at__isnull=True,
            fired_at__gte=since,
            slot__lt=claim.plan.slot,
        ).exists()
    )


def claim(c: Claim) -> Outcome:
    """Claim ``c.plan.slot`` for ``c.entry`` (see the module docstring); commits before return."""
    return claim_and_write(c)[0]


def claim_and_write(c: Claim) -> tuple[Outcome, OutboxMessage | None]:
    """Claim ``c.plan.slot``; return the outcome and, for a fired slot, its outbox row.

    The row is written in the claim's transaction, so a committed claim of a fired slot
    always has its message waiting to be published.
    """
    # Imported here: the worker-side functions below must work in projects that do not
    # install django_celery_beat.
    from django_celery_beat.models import PeriodicTask

    slot = c.plan.slot
    try:
        with transaction.atomic():
            if not lease.fence(c.lock_name, c.holder, c.token, c.ttl):
                raise _Abort(Outcome.LOST)
            now = timezone.now()
            status = FireStatus.FIRED if c.plan.fire else FireStatus.MISSED
            overlap_skip = c.policy.overlap == slots.OVERLAP_SKIP
            if status == FireStatus.FIRED and overlap_skip and _previous_run_active(c, now):
                status = FireStatus.SKIPPED
            fired = status == FireStatus.FIRED
            advanced = (
                PeriodicTask.objects.filter(pk=c.periodic_task_id)
                .filter(Q(last_run_at__isnull=True) | Q(last_run_at__lt=slot))
                .update(
                    last_run_at=slot,
                    total_run_count=F("total_run_count") + (1 if fired else 0),
                )
            )
            if not advanced:
                raise _Abort(Outcome.STALE)
            common = {"token": c.token, "holder": c.holder, "task": c.task, "fired_at": now}
            if c.plan.missed:
                BeatFire.objects.bulk_create(
                    [
                        BeatFire(entry=c.entry, slot=s, status=FireStatus.MISSED, **common)
                        for s in c.plan.missed
                    ],
                    ignore_conflicts=True,
                )
            try:
                with transaction.atomic():
                    BeatFire.objects.create(
                        entry=c.entry,
                        slot=slot,
                        status=status,
                        task_id=c.task_id if fired else "",
                        detail=_detail(c, status),
                        **common,
                    )
            except IntegrityError:
                raise _Abort(Outcome.TAKEN) from None
            row = _write_row(c) if fired else None
    except _Abort as abort:
        return abort.outcome, None
    return Outcome(status), row


def _write_row(c: Claim) -> OutboxMessage | None:
    m = c.message
    if m is None:
        return None
    return delivery.add_row(
        c.task,
        c.task_id,
        m.args,
        m.kwargs,
        m.options,
        headers=m.headers,
        guard=m.guard,
        idempotency_key=str(m.guard.get("idempotency_key") or ""),
        prepared=m.prepared,
    )


def _detail(c: Claim, status: str) -> str:
    if status == FireStatus.SKIPPED:
        return "previous run still running (overlap=skip)"
    if status == FireStatus.MISSED:
        return f"late beyond grace (catchup={c.policy.catchup})"
    if c.plan.missed_total:
        return f"caught up: {c.plan.missed_total} older slot(s) missed"
    return ""


def message_headers(entry: str, slot: datetime, token: int) -> dict[str, Any]:
    """Return the headers a beat-fired task carries: the guard header's ``beat`` field.

    It holds the slot (entry, slot time, the leader's fencing token) and the slot's key
    ``beat:<entry>:<slot>``, which any task can read to deduplicate its own effects.
    """
    beat = {
        "entry": entry,
        "slot": slots.format_slot(slot),
        "token": token,
        "key": slots.slot_key(entry, slot),
    }
    return {headers.HEADER: {"v": headers.VERSION, headers.BEAT: beat}}


def _slot_of(value: Mapping[str, Any] | None) -> tuple[str, datetime] | None:
    if not isinstance(value, Mapping):
        return None
    try:
        slot = datetime.fromisoformat(str(value["slot"]).replace("Z", "+00:00"))
        return str(value["entry"]), slot
    except (KeyError, ValueError):
        return None


def record_start(beat: Mapping[str, Any] | None) -> None:
    """Worker side: mark the fire row of a beat-fired task (its ``beat`` field) as started."""
    where = _slot_of(beat)
    if where is not None:
        BeatFire.objects.filter(entry=where[0], slot=where[1]).update(started_at=timezone.now())


def record_finish(beat: Mapping[str, Any] | None, state: str | None) -> None:
    """Worker side: mark the fire row finished once the run reached a final state."""
    where = _slot_of(beat)
    if where is not None and state in states.READY_STATES:
        BeatFire.objects.filter(entry=where[0], slot=where[1]).update(finished_at=timezone.now())


def lateness(entry: str, since: datetime, now: datetime) -> float | None:
    """Seconds the latest slot of ``entry`` due since ``since`` was late (the SLO figure).

    A fired slot is as late as its fire row was written after its due time; a missed one
    (catch-up policy) likewise; a slot whose publish failed, until ``now``. The entry's next
    slot, if already due and not claimed, counts until ``now`` too: that is what catches a
    beat that stopped altogether. ``None`` when no such entry exists.
    """
    from django_celery_beat.models import PeriodicTask

    task = PeriodicTask.objects.filter(name=entry).first()
    if task is None:
        return None
    worst = 0.0
    rows = BeatFire.objects.filter(
        entry=entry,
        slot__gte=since,
        status__in=(FireStatus.FIRED, FireStatus.MISSED, FireStatus.FAILED),
    ).values_list("status", "slot", "fired_at")
    for status, slot, fired_at in rows:
        until = now if status == FireStatus.FAILED else fired_at
        worst = max(worst, (until - slot).total_seconds())
    due = _pending_slot(task, now)
    if due is not None:
        worst = max(worst, (now - due).total_seconds())
    return worst


def _pending_slot(task: Any, now: datetime) -> datetime | None:
    """The entry's next slot if it is due by ``now`` (as django-celery-beat would run it)."""
    if not task.enabled or (task.expires is not None and now >= task.expires):
        return None
    if task.one_off and task.total_run_count:
        return None
    after = task.last_run_at or task.date_changed
    try:
        due = slots.next_slot(task.schedule, after)
    except Exception:  # a schedule without a usable estimate (e.g. an invalid solar event)
        logger.warning("celery_guard: cannot compute the next slot of %s", task.name, exc_info=True)
        return None
    if task.start_time is not None and due < task.start_time:
        due = slots.to_utc(task.start_time)
    return due if due <= now else None
