"""What the sweep makes of an open item: its idempotency record tells whether a message is
still coming (see ``docs/runs.md``, "Items whose message is gone").

Every item of a run has an idempotency key (derived from the run and the item, or the task's
own), and the ledger records each step of its messages: the claim and its confirmation at
the publish, the start (a lease a live worker renews), the outcome, a retry giving the lease
back. The broker cannot be asked whether a message still exists; the ledger can be asked
whether anything happened to the item lately. An item whose record shows no life for longer
than its message could take to come back (the visibility timeout, the start grace, the
sweep grace, and for a retry its longest backoff) has no message left: a worker SIGKILLed
between taking the message and recording it, a lost Redis, an outcome that could not be
written.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from celery_guard.idempotency.models import KeyState

#: A message may still come: leave the item.
WAIT = "wait"
#: The item's message is gone: publish it again (the same task id and key).
LOST = "lost"
#: The key succeeded for this item: the worker died before recording it.
SUCCEEDED = "succeeded"
#: The key succeeded for another call (the task's own key): the item is a duplicate.
SKIPPED = "skipped"
#: The key failed a while ago and its retry may still come: final only if dead-lettered.
FAILING = "failing"


@dataclass(frozen=True)
class Bounds:
    """How long a message may take before its item counts as lost.

    Attributes:
        now: The sweep's time.
        stale: Seconds without a sign of life: the visibility timeout, the start grace and
            the sweep grace.
        retry_slack: Extra seconds for an item waiting for its retry (the longest backoff).
        progressing: An item of the run became final within ``stale``: its queue is moving,
            so a pending item may still be waiting its turn behind the others.
    """

    now: dt.datetime
    stale: float
    retry_slack: float
    progressing: bool

    def older(self, moment: dt.datetime | None, extra: float = 0.0) -> bool:
        """Whether ``moment`` is longer ago than the bound (plus ``extra`` seconds)."""
        return moment is None or moment + dt.timedelta(seconds=self.stale + extra) < self.now


def verdict(task_id: str, record: dict[str, Any] | None, bounds: Bounds) -> str:
    """What to do with an open item whose message has the id ``task_id``.

    Args:
        task_id: The item's task id.
        record: Its key's ledger record (``Ledger.get``), or None when there is none.
        bounds: The sweep's bounds for the item's run.
    """
    if record is None:
        # Never claimed, or the ledger lost it (a Redis without persistence, purged).
        return WAIT if bounds.progressing else LOST
    state = record["state"]
    if state == KeyState.SUCCEEDED:
        return SUCCEEDED if record["task_id"] == task_id else SKIPPED
    if record["task_id"] != task_id:
        # Another call holds the task's own key; a new publish resolves it (a duplicate).
        return WAIT if bounds.progressing else LOST
    if state == KeyState.RUNNING:
        # A live worker renews or ends its lease; a redelivery takes it over once expired.
        return LOST if bounds.older(record["lease_expires_at"]) else WAIT
    if state == KeyState.PENDING and not record["owner"]:
        # Published, not started: behind the others in a moving queue, or lost.
        if bounds.progressing:
            return WAIT
        return LOST if bounds.older(record["updated_at"]) else WAIT
    # Failed, or a lease given back: a retry is on its way after its backoff, or the
    # failure was final (dead-lettered) and its outcome could not be recorded.
    if bounds.older(record["updated_at"], bounds.retry_slack):
        return LOST
    return FAILING if bounds.older(record["updated_at"]) else WAIT
