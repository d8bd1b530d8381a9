"""Celery signal receivers that record how each replay of a dead letter ran."""

from __future__ import annotations

import logging
from typing import Any

from celery import signals, states
from django.db import connections, router, transaction
from django.utils import timezone

from celery_guard.core import headers
from celery_guard.dlq import records, services
from celery_guard.dlq.models import FINAL_OUTCOMES, DeadLetter, DeadLetterReplay, ReplayOutcome
from celery_guard.idempotency import dedup
from celery_guard.observability import providers

logger = logging.getLogger("celery_guard.receivers")

#: Longest wait, in seconds, of a finished replay for the claim that published it (PostgreSQL;
#: SQLite's busy timeout bounds it there).
CLAIM_WAIT = 5


def _request_headers(task: Any) -> Any:
    return getattr(getattr(task, "request", None), "headers", None)


def _replay_of(task: Any) -> int | None:
    # Kept to dictionary look-ups: this runs before and after every task of the worker.
    return records.replay_of(headers.read(_request_headers(task)))


def replay_outcome(state: str | None, retval: Any = None, *, skipped: bool = False) -> str | None:
    """The replay outcome that a task's end state means, or None when it means none.

    ``IGNORED`` (the task asked for no state, e.g. ``Task.replace``) and ``None`` (the process
    is stopping mid-run; the redelivery reports) leave the outcome as it was. A success that
    was a skip of a key that already succeeded (``skipped``) is ``skipped``.
    """
    if state == states.SUCCESS:
        return ReplayOutcome.SKIPPED if skipped else ReplayOutcome.SUCCEEDED
    if state == states.RETRY:
        return ReplayOutcome.RETRYING
    if state == states.REJECTED:
        # Requeued (the guard does so when it cannot write the dead letter): it runs again.
        return ReplayOutcome.RETRYING if getattr(retval, "requeue", False) else ReplayOutcome.FAILED
    if state in (states.FAILURE, states.REVOKED):
        return ReplayOutcome.FAILED
    return None


def record_replay_outcome(task_id: str, replay_of: int, outcome: str) -> int:
    """Set the outcome of the replay record of ``task_id``; return the rows updated (0 or 1).

    A final outcome always wins (the last one, should a finished replay be redelivered); a
    running one never overwrites a final one.
    """
    now = timezone.now()
    rows = DeadLetterReplay.objects.filter(task_id=task_id, dead_letter_id=replay_of)
    values: dict[str, Any] = {"outcome": outcome, "updated_at": now}
    if outcome in FINAL_OUTCOMES:
        values["finished_at"] = now
    else:
        rows = rows.exclude(outcome__in=FINAL_OUTCOMES)
    updated: int = rows.update(**values)
    if updated or outcome not in FINAL_OUTCOMES:
        # A running outcome that found no record is not worth a wait: the end of the run
        # (which waits below) overwrites it anyway.
        return updated
    # The record is committed with the claim of its batch, after every publish of the batch,
    # so a quick run can end before it is visible. The claim holds the dead letter locked
    # until it commits: once that lock is ours, the record is committed, or it never will be
    # (the replaying process died, or the dead letter was purged).
    using = router.db_for_write(DeadLetterReplay)
    with transaction.atomic(using=using):
        if connections[using].vendor == "postgresql":
            with connections[using].cursor() as cursor:
                cursor.execute(f"SET LOCAL lock_timeout = '{CLAIM_WAIT}s'")
        list(DeadLetter.objects.select_for_update().filter(pk=replay_of).values_list("pk"))
        updated = rows.update(**values)
    if not updated:
        logger.warning(
            "celery_guard: replay %s of dead letter %s ended %s, but it has no replay record "
            "(purged, or its claim was never committed): outcome not recorded",
            task_id,
            replay_of,
            outcome,
        )
    return updated


def replay_run_started(task_id: str | None = None, task: Any = None, **kw: Any) -> None:
    """Mark the replay record of a replayed dead letter as started."""
    replay_of = _replay_of(task)
    if replay_of is None or not task_id:
        return
    try:
        record_replay_outcome(task_id, replay_of, ReplayOutcome.STARTED)
    except Exception:  # bookkeeping must never fail the task itself
        logger.exception("celery_guard: could not record the start of replay %s", task_id)


def replay_run_finished(
    task_id: str | None = None,
    task: Any = None,
    state: str | None = None,
    retval: Any = None,
    **kw: Any,
) -> None:
    """Record how a run of a replayed dead letter ended: succeeded, retrying or failed.

    Sent after the failure pipeline, so a replay that failed for good has written its new
    dead letter by then.
    """
    replay_of = _replay_of(task)
    if replay_of is None or not task_id:
        return
    skipped = dedup.context(getattr(task, "request", None)).skipped
    outcome = replay_outcome(state, retval, skipped=skipped)
    if outcome is None:
        return
    try:
        record_replay_outcome(task_id, replay_of, outcome)
    except Exception:  # bookkeeping must never fail the task itself
        logger.exception("celery_guard: could not record the outcome of replay %s", task_id)


def connect() -> None:
    """Connect the receivers; ``dispatch_uid`` makes repeated calls harmless."""
    providers.register("dead_letters", services.open_counts)
    signals.task_prerun.connect(
        replay_run_started, dispatch_uid="celery_guard.replay_run_started", weak=False
    )
    signals.task_postrun.connect(
        replay_run_finished, dispatch_uid="celery_guard.replay_run_finished", weak=False
    )
