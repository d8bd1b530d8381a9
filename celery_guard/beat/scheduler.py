"""``GuardedScheduler``: django-celery-beat's ``DatabaseScheduler`` behind a database lease.

Run ``celery beat -S celery_guard.beat:GuardedScheduler`` on as many hosts as you like: one
holds the lease and dispatches, the others stand by. Each slot is claimed with a unique
fire record, written together with its message as an outbox row, before it is published
(``celery_guard.beat.fires``): a slot is claimed at most once even by a frozen ex-leader that
has not yet noticed it lost the lease, and a claimed slot is published even if the beat dies
right after its claim (the delivery poller publishes the row).
"""

from __future__ import annotations

import datetime
import logging
import uuid
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.db import Error
from django_celery_beat.schedulers import DatabaseScheduler

from celery_guard.beat import checks, fires, lease, slots
from celery_guard.conf import guard_settings
from celery_guard.core import pipeline
from celery_guard.delivery import services as delivery
from celery_guard.delivery.models import OutboxMessage
from celery_guard.observability import events

logger = logging.getLogger(__name__)


class GuardedScheduler(DatabaseScheduler):  # type: ignore[misc]
    """A ``DatabaseScheduler`` that dispatches only while it holds the beat lease.

    Each tick first acquires or renews the lease (``celery_guard.beat.lease``). A standby ticks
    every ``beat_max_loop_interval`` and takes over within lease seconds plus one tick once
    the leader stops renewing. A new leader re-reads the schedule from the database before
    it dispatches anything. Due entries are planned per slot (``celery_guard.beat.slots``) and
    claimed (``celery_guard.beat.fires``) before publishing; ``last_run_at`` is written in the
    claim and only ever moves forward, instead of in django-celery-beat's periodic sync.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Set up the scheduler; the lease is not touched until the first tick.

        Raises:
            ImproperlyConfigured: ``USE_TZ`` is off (``celery_guard.E007``), which the system
                check cannot see when the scheduler is chosen with ``celery beat -S``.
        """
        if not guard_settings.use_tz:
            raise ImproperlyConfigured(
                f"celery_guard.E007: {checks.NAIVE_BEAT_MESSAGE} {checks.NAIVE_BEAT_HINT}"
            )
        self._plans: dict[str, slots.Plan] = {}
        self._needs_reload = False
        super().__init__(*args, **kwargs)
        self.lease = lease.Lease(
            guard_settings.beat_lock_name,
            guard_settings.beat_lease_seconds,
            renew_every=self.max_interval,
            sender=self,
        )

    @property
    def retry_interval(self) -> float:
        """Seconds to wait after a database error before trying again."""
        return float(min(1.0, self.max_interval))

    @property
    def grace(self) -> float:
        """Seconds a due slot may be late and still be on time (see ``slots.plan``)."""
        return float(max(2 * self.max_interval, 1.0))

    def tick(self, *args: Any, **kwargs: Any) -> float:
        """Lease step, then (as leader only) one ``DatabaseScheduler`` tick."""
        event = self.lease.step()
        if event is lease.Event.ERROR:
            return self.retry_interval
        reload = event is lease.Event.ACQUIRED or self._needs_reload
        if reload and self.lease.valid() and not self._reload():
            return self.retry_interval
        if not self.lease.valid():
            return float(self.max_interval)
        try:
            delay = float(super().tick(*args, **kwargs))
        except Error as exc:
            self._database_error("tick", exc)
            return self.retry_interval
        return min(delay, self.lease.seconds_until_renewal())

    def _reload(self) -> bool:
        """Re-read every entry (and its ``last_run_at``) from the database; reset the heap."""
        try:
            self._schedule = self.all_as_schedule()
            self._last_timestamp = self.Changes.last_change()
        except Error as exc:
            self._database_error("schedule reload", exc)
            return False
        self._initial_read = False
        self._last_full_sync = datetime.datetime.now()
        self._heap = None
        self.old_schedulers = None
        self._plans.clear()
        self._needs_reload = False
        logger.info(
            "celery_guard: beat %s re-read %d entries from the database",
            self.lease.identity,
            len(self._schedule),
        )
        return True

    def _database_error(self, where: str, exc: BaseException) -> None:
        logger.warning(
            "celery_guard: beat %s: database error in %s, not dispatching until the lease "
            "and the schedule are confirmed again: %r",
            self.lease.identity,
            where,
            exc,
        )
        lease.drop_connection()
        self._needs_reload = True

    def is_due(self, entry: Any) -> tuple[bool, float]:
        """Ask the entry, then plan the due slot; the delay returned points at the next slot."""
        self._plans.pop(entry.name, None)
        due, delay = entry.is_due()
        if not due:
            return due, delay
        now = datetime.datetime.now(datetime.timezone.utc)
        policy = slots.policy_for(entry.name, guard_settings.beat_policies)
        plan = slots.plan(entry.schedule, entry.last_run_at, now, policy=policy, grace=self.grace)
        if plan is None:  # the schedule's own rounding calls it due before its slot
            first = slots.next_slot(entry.schedule, entry.last_run_at)
            return False, max(0.0, (first - now).total_seconds())
        self._plans[entry.name] = plan
        return True, max(0.0, (plan.following - now).total_seconds())

    def reserve(self, entry: Any) -> Any:
        """Advance the entry to its planned slot in memory (the claim persists it)."""
        plan = self._plans.get(entry.name)
        new_entry = next(entry)
        if plan is not None:
            new_entry.last_run_at = new_entry.model.last_run_at = plan.slot
        return new_entry

    def apply_entry(self, entry: Any, producer: Any = None) -> None:
        """Claim the planned slot; publish the task only if the claim says so."""
        plan = self._plans.pop(entry.name, None)
        token = self.lease.token
        if plan is None or token is None or not self.lease.valid():
            self._needs_reload = True
            return
        policy = slots.policy_for(entry.name, guard_settings.beat_policies)
        claim = fires.Claim(
            lock_name=self.lease.name,
            holder=self.lease.identity,
            token=token,
            ttl=self.lease.ttl,
            entry=entry.name,
            periodic_task_id=entry.model.pk,
            task=entry.task,
            task_id=str(uuid.uuid4()),
            plan=plan,
            policy=policy,
            message=self._message(entry, plan.slot, token),
        )
        started = self.lease.clock()
        try:
            outcome, row = fires.claim_and_write(claim)
        except Error as exc:
            self._database_error(f"claim of {entry.name}", exc)
            return
        key = slots.slot_key(entry.name, plan.slot)
        if outcome is fires.Outcome.LOST:
            self.lease.lost(f"fencing check failed claiming {key}")
            self._needs_reload = True
            return
        self.lease.extended(started)
        if outcome in (fires.Outcome.STALE, fires.Outcome.TAKEN):
            logger.info("celery_guard: beat did not fire %s: %s", key, outcome.value)
            # The database's last run is ahead of ours: read it. (A taken slot whose last run
            # is behind, e.g. moved back by hand, is simply passed over in memory.)
            if outcome is fires.Outcome.STALE:
                self._needs_reload = True
            return
        if plan.missed_total:
            logger.warning(
                "celery_guard: beat %s: %d slot(s) of %s missed (catchup=%s)",
                self.lease.identity,
                plan.missed_total,
                entry.name,
                policy.catchup,
            )
        if outcome is fires.Outcome.FIRED:
            self._publish(entry, claim, row, producer)
        else:
            logger.info("celery_guard: beat did not fire %s: %s", key, outcome.value)

    def _message(self, entry: Any, slot: datetime.datetime, token: int) -> fires.Message:
        """What the slot publishes: the entry's call with the slot's headers (and key)."""
        options = dict(entry.options)
        message_headers = {
            **(options.pop("headers", None) or {}),
            **fires.message_headers(entry.name, slot, token),
        }
        guard = dict(options.pop("guard", None) or {})
        options.pop("task_id", None)
        guarded = pipeline.is_guarded(self.app.tasks.get(entry.task))
        if guarded:
            # The slot's key becomes the task's idempotency key, so a redelivered or
            # re-published run of this slot (the beat's and the poller's publish of one
            # outbox row) is deduplicated by the ledger too.
            guard["idempotency_key"] = slots.slot_key(entry.name, slot)
        return fires.Message(
            args=list(entry.args or ()),
            kwargs=dict(entry.kwargs or {}),
            options=options,
            headers=message_headers,
            guard=guard,
            prepared=not guarded,
        )

    def _publish(
        self, entry: Any, claim: fires.Claim, row: OutboxMessage | None, producer: Any
    ) -> None:
        """Publish the claimed slot's outbox row now; the delivery poller does if this fails."""
        slot = claim.plan.slot
        key = slots.slot_key(entry.name, slot)
        events.emit(
            "slot_fired",
            task_name=entry.task,
            task_id=claim.task_id,
            entry=entry.name,
            slot=slot.isoformat(),
            missed=claim.plan.missed_total,
        )
        if row is None or not delivery.publish_now(self.app, row, producer=producer):
            logger.warning(
                "celery_guard: beat did not publish %s now; the delivery poller will publish "
                "its outbox row",
                key,
            )
            return
        logger.info(
            "celery_guard: beat fired %s as %s[%s] (token %s)",
            key,
            entry.task,
            claim.task_id,
            claim.token,
        )

    def close(self) -> None:
        """Sync and close as ``DatabaseScheduler`` does, then release the lease."""
        try:
            super().close()
        finally:
            self.lease.release()
