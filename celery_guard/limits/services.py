"""Every change of a task policy, and the workers' cached read of the policies.

Workers never query the database per task: each process keeps the policy table in memory and
reads it again at most every ``CELERY_GUARD_POLICY_REFRESH`` seconds (2 by default), so a
change made in the admin reaches every worker within that time plus the deferral delay.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

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


_policies: dict[str, Policy] = {}
_loaded_at: float | None = None


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
        if row.paused or row.concurrency or rate:
            found[row.task_name] = Policy(row.paused, row.concurrency or None, rate)
    return found


def current(task_name: str) -> Policy | None:
    """The policy of ``task_name`` as this process last read it (re-read when stale).

    When the database cannot be read, the last policies read stay in force (logged).
    """
    global _policies, _loaded_at
    now = time.monotonic()
    if _loaded_at is None or now - _loaded_at >= guard_settings.policy_refresh:
        _loaded_at = now
        try:
            _policies = _load()
        except Exception:
            logger.warning(
                "celery_guard: could not read the task policies; keeping the last ones read",
                exc_info=True,
            )
            dbreuse.close_unusable()
    return _policies.get(task_name)


def forget() -> None:
    """Drop this process's cached policies (the next run reads them)."""
    global _loaded_at
    _loaded_at = None


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


def save_policy(row: TaskPolicy) -> TaskPolicy:
    """Save a policy edited as a whole (the admin's form), validated."""
    row.full_clean()
    row.save()
    return row
