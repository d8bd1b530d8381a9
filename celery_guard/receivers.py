"""Celery signal receivers, connected once from ``AppConfig.ready()``."""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import signals, states
from django.db import connections, router, transaction
from django.utils import timezone

from celery_guard import deadletter, failures, fires, headers
from celery_guard import signals as guard_signals
from celery_guard.conf import guard_settings
from celery_guard.models import DeadLetter, DeadLetterReplay

logger = logging.getLogger(__name__)

#: Outcomes that a later delivery of the same replay does not turn back into a running one.
FINAL_OUTCOMES = (DeadLetterReplay.SUCCEEDED, DeadLetterReplay.FAILED)
#: Longest wait, in seconds, of a finished replay for the claim that published it (PostgreSQL;
#: SQLite's busy timeout bounds it there).
CLAIM_WAIT = 5


def log_start(sender: Any = None, task_id: str | None = None, task: Any = None, **kw: Any) -> None:
    """Log when a guarded task starts, with its attempt and its lag since the first enqueue."""
    guard = headers.read(getattr(task.request, "headers", None)) if task is not None else {}
    if not guard:
        return
    first = guard.get("first_enqueued_at")
    lag = time.time() - first if isinstance(first, (int, float)) else None
    logger.info(
        "celery_guard: %s[%s] started: attempt %s, priority %s, %.3fs after first enqueue",
        getattr(task, "name", sender),
        task_id,
        guard.get("attempt"),
        guard.get("priority"),
        lag if lag is not None else float("nan"),
    )


def _request_headers(task: Any) -> Any:
    return getattr(getattr(task, "request", None), "headers", None)


def beat_run_started(task: Any = None, **kw: Any) -> None:
    """Mark the fire record of a beat-fired task as started (for the overlap policy)."""
    message_headers = _request_headers(task)
    if not message_headers or fires.BEAT_HEADER not in message_headers:
        return
    try:
        fires.record_start(message_headers)
    except Exception:  # bookkeeping must never fail the task itself
        logger.exception("celery_guard: could not record the start of a beat-fired task")


def beat_run_finished(task: Any = None, state: str | None = None, **kw: Any) -> None:
    """Mark the fire record of a beat-fired task as finished once it reaches a final state."""
    message_headers = _request_headers(task)
    if not message_headers or fires.BEAT_HEADER not in message_headers:
        return
    try:
        fires.record_finish(message_headers, state)
    except Exception:  # bookkeeping must never fail the task itself
        logger.exception("celery_guard: could not record the end of a beat-fired task")


def _replay_of(task: Any) -> int | None:
    # Kept to dictionary look-ups: this runs before and after every task of the worker.
    return deadletter.replay_of(headers.read(_request_headers(task)))


def replay_outcome(state: str | None, retval: Any = None) -> str | None:
    """The replay outcome that a task's end state means, or None when it means none.

    ``IGNORED`` (the task asked for no state, e.g. ``Task.replace``) and ``None`` (the process
    is stopping mid-run; the redelivery reports) leave the outcome as it was.
    """
    if state == states.SUCCESS:
        return DeadLetterReplay.SUCCEEDED
    if state == states.RETRY:
        return DeadLetterReplay.RETRYING
    if state == states.REJECTED:
        # Requeued (the guard does so when it cannot write the dead letter): it runs again.
        return (
            DeadLetterReplay.RETRYING
            if getattr(retval, "requeue", False)
            else DeadLetterReplay.FAILED
        )
    if state in (states.FAILURE, states.REVOKED):
        return DeadLetterReplay.FAILED
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
        record_replay_outcome(task_id, replay_of, DeadLetterReplay.STARTED)
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
    outcome = replay_outcome(state, retval)
    if outcome is None:
        return
    try:
        record_replay_outcome(task_id, replay_of, outcome)
    except Exception:  # bookkeeping must never fail the task itself
        logger.exception("celery_guard: could not record the outcome of replay %s", task_id)


def release_dead_lettered_key(
    sender: Any = None,
    task_name: str | None = None,
    task_id: str | None = None,
    idempotency_key: str | None = None,
    reason: str | None = None,
    **kw: Any,
) -> None:
    """Release the key of a dead-lettered run, so a corrected resubmission or replay can run.

    Only while that run still holds the key; off with
    ``CELERY_GUARD_RELEASE_ON_DEAD_LETTER = False``.
    """
    if not idempotency_key:
        return
    if not guard_settings.release_on_dead_letter:
        logger.info(
            "celery_guard: %s[%s] dead-lettered (%s); key %r kept "
            "(CELERY_GUARD_RELEASE_ON_DEAD_LETTER is off)",
            task_name,
            task_id,
            reason,
            idempotency_key,
        )
        return
    from celery_guard import idempotency

    logger.info("celery_guard: %s[%s] dead-lettered (%s)", task_name, task_id, reason)
    idempotency.release(idempotency_key, task_id)


def connect() -> None:
    """Connect every receiver; ``dispatch_uid`` makes repeated calls harmless."""
    signals.task_prerun.connect(log_start, dispatch_uid="celery_guard.log_start", weak=False)
    # Only unguarded tasks (CELERY_GUARD_CAPTURE_UNGUARDED): guarded ones are recorded from
    # the task call itself, where a failed write can keep the message.
    signals.task_failure.connect(
        failures.capture_unguarded, dispatch_uid="celery_guard.capture_unguarded", weak=False
    )
    signals.task_prerun.connect(
        beat_run_started, dispatch_uid="celery_guard.beat_run_started", weak=False
    )
    signals.task_postrun.connect(
        beat_run_finished, dispatch_uid="celery_guard.beat_run_finished", weak=False
    )
    signals.task_prerun.connect(
        replay_run_started, dispatch_uid="celery_guard.replay_run_started", weak=False
    )
    signals.task_postrun.connect(
        replay_run_finished, dispatch_uid="celery_guard.replay_run_finished", weak=False
    )
    guard_signals.dead_lettered.connect(
        release_dead_lettered_key,
        dispatch_uid="celery_guard.release_dead_lettered_key",
        weak=False,
    )
