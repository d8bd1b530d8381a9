"""Every change of a task policy, and the workers' cached read of the policies.

Workers never query the database per task: each process keeps the policy table in memory and
reads it again at most every ``CELERY_GUARD_POLICY_REFRESH`` seconds (2 by default), so a
change made in the admin reaches every worker within that time plus the deferral delay. A
publishing process (a web process) reads it the same way for the priority override, and never
inside a transaction that has already failed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from django.db import connection, transaction

from celery_guard.conf import guard_settings
from celery_guard.core import dbreuse
from celery_guard.limits import rules
from celery_guard.limits.models import TaskPolicy

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Policy:
    """What a worker applies of one task type's policy row."""

    paused: bool = False
    concurrency: int | None = None
    rate: rules.Rate | None = None
    #: A priority level (a key of ``CELERY_GUARD_PRIORITY_QUEUES``) replacing the task's.
    priority: str | None = None


_policies: dict[str, Policy] = {}
#: When (``time.monotonic()``) the policies read last are to be read again.
_stale_at = 0.0


def _load() -> dict[str, Policy]:
    found = {}
    for row in TaskPolicy.objects.all():
        rate = None
        if row.rate:
            try:
                rate = rules.parse_rate(row.rate)
            except (TypeError, ValueError):
                logger.warning(
                    "celery_guard: task policy of %s has an invalid rate %r; ignored",
                    row.task_name,
                    row.rate,
                )
        priority = row.priority or None
        if priority is not None and priority not in guard_settings.priority_queues:
            logger.warning(
                "celery_guard: task policy of %s names the priority level %r, which "
                "CELERY_GUARD_PRIORITY_QUEUES no longer defines; ignored",
                row.task_name,
                priority,
            )
            priority = None
        if row.paused or row.concurrency or rate or priority:
            found[row.task_name] = Policy(row.paused, row.concurrency or None, rate, priority)
    return found


def current(task_name: str) -> Policy | None:
    """The policy of ``task_name`` as this process last read it (re-read when stale).

    When the database cannot be read, the last policies read stay in force (logged).
    """
    global _policies, _stale_at
    now = time.monotonic()
    if now >= _stale_at:
        _stale_at = now + guard_settings.policy_refresh
        try:
            if connection.in_atomic_block:
                # A publish inside the caller's transaction: a failed read rolls back to this
                # savepoint and leaves the caller's transaction usable.
                with transaction.atomic():
                    _policies = _load()
            else:
                _policies = _load()
        except Exception:
            logger.warning(
                "celery_guard: could not read the task policies; keeping the last ones read",
                exc_info=True,
            )
            dbreuse.close_unusable()
    return _policies.get(task_name)


def for_publish(task_name: str) -> Policy | None:
    """The policy of ``task_name`` for a publish (the priority override).

    As :func:`current`, but the connection is looked at only when a read is due, and a
    transaction that has already failed is never read in: the policies cached answer then.
    """
    if time.monotonic() < _stale_at:  # every publish but one per refresh: no setting read
        return _policies.get(task_name)
    if connection.in_atomic_block and connection.needs_rollback:
        return _policies.get(task_name)
    return current(task_name)


def forget() -> None:
    """Drop this process's cached policies (the next run reads them)."""
    global _stale_at
    _stale_at = 0.0


def set_paused(task_name: str, paused: bool, note: str | None = None) -> TaskPolicy:
    """Pause or resume a task type (creating its policy row when it has none)."""
    row, _ = TaskPolicy.objects.get_or_create(task_name=task_name)
    row.paused = paused
    fields = ["paused", "updated_at"]
    if note is not None:
        row.note = note
        fields.append("note")
    row.save(update_fields=fields)
    logger.warning("celery_guard: task type %s %s", task_name, "paused" if paused else "resumed")
    return row


def set_limits(task_name: str, *, concurrency: int | None = None, rate: str = "") -> TaskPolicy:
    """Override a task type's concurrency and rate (``None``/``""``: the task's own).

    Raises:
        ValueError: The rate is not ``N/s|m|h``, or the concurrency is below 1.
    """
    if rate:
        rules.parse_rate(rate)
    if concurrency is not None:
        rules.parse_concurrency(concurrency)
    row, _ = TaskPolicy.objects.get_or_create(task_name=task_name)
    row.concurrency, row.rate = concurrency, rate
    row.save(update_fields=["concurrency", "rate", "updated_at"])
    return row


def set_priority(task_name: str, level: str) -> TaskPolicy:
    """Override a task type's priority level (``""``: the task's own).

    Raises:
        django.core.exceptions.ValidationError: ``level`` is not a key of
            ``CELERY_GUARD_PRIORITY_QUEUES``.
    """
    # Checked before the row is created: a refused level leaves no policy behind.
    TaskPolicy._meta.get_field("priority").clean(level, None)
    row, _ = TaskPolicy.objects.get_or_create(task_name=task_name)
    row.priority = level
    row.save(update_fields=["priority", "updated_at"])
    return row


def save_policy(row: TaskPolicy) -> TaskPolicy:
    """Save a policy edited as a whole (the admin's form), validated."""
    row.full_clean()
    row.save()
    return row
