"""Worker side of bulk runs: mark an item running, record its one final outcome."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery.exceptions import Ignore, Reject, Retry

from celery_guard.dlq.models import DeadLetter
from celery_guard.exceptions import Deferral
from celery_guard.failures.retry import qualified_name
from celery_guard.idempotency.dedup import context
from celery_guard.runs import launch, services
from celery_guard.runs.models import ItemStatus

logger = logging.getLogger(__name__)

#: Runs this process has seen started: the queued -> running update is made once per process.
_started_runs: set[int] = set()
_MAX_REMEMBERED = 10_000


def run_item(task: Any, run_id: int, item_id: int, call: Callable[[], Any]) -> Any:
    """Run one delivery of a run's item (``call()``: the steps inside and the body).

    Records the item's outcome when it is final.

    A retry (transient failure, or the key busy elsewhere) leaves the item running; a final
    failure (dead-lettered by the failure step inside) makes it ``failed``; a success makes
    it ``succeeded``, or ``skipped`` when the idempotency key had already succeeded for
    another task. A delivery of an item that is final already (cancelled, or a duplicate
    message) does not run the body.
    """
    request = task.request
    try:
        started = services.start_item(run_id, item_id, mark_run=run_id not in _started_runs)
    except Exception as exc:
        logger.exception("celery_guard: cannot mark item %s of run %s running", item_id, run_id)
        # Leave the message on the broker: acking it here would lose the item.
        raise Reject(exc, requeue=True) from exc
    if len(_started_runs) > _MAX_REMEMBERED:
        _started_runs.clear()
    _started_runs.add(run_id)
    if not started:
        logger.info(
            "celery_guard: %s[%s]: item %s of run %s is final already (cancelled, or a "
            "duplicate delivery); not running it",
            task.name,
            request.id,
            item_id,
            run_id,
        )
        return None
    try:
        result = call()
    except Deferral:
        # Put off by a limit or a pause: the body did not run, so this was not an attempt.
        _not_an_attempt(run_id, item_id)
        raise
    except Retry:
        raise
    except Reject as rejected:
        if not rejected.requeue:  # dead-lettered as rejected by the failure step
            _failed(task, run_id, item_id, rejected)
        raise
    except Ignore:
        _record(task, run_id, item_id, ItemStatus.SUCCEEDED, message="ignored by the task")
        raise
    except Exception as exc:
        _failed(task, run_id, item_id, exc)
        raise
    skipped_for = context(request).skipped_for
    if skipped_for is not None and skipped_for != request.id:
        _record(
            task,
            run_id,
            item_id,
            ItemStatus.SKIPPED,
            message=f"deduplicated: the idempotency key already succeeded in task {skipped_for}",
        )
    else:
        # skipped_for == own id: an earlier delivery of this item succeeded and died before
        # recording it; it is this item's success.
        _record(task, run_id, item_id, ItemStatus.SUCCEEDED)
    return result


def _not_an_attempt(run_id: int, item_id: int) -> None:
    try:
        services.uncount_attempt(item_id)
    except Exception:
        logger.warning(
            "celery_guard: item %s of run %s was deferred; its attempt count could not be "
            "corrected",
            item_id,
            run_id,
            exc_info=True,
        )


def _failed(task: Any, run_id: int, item_id: int, exc: BaseException) -> None:
    try:
        letter = (
            DeadLetter.objects.filter(task_id=task.request.id)
            .order_by("-id")
            .values_list("pk", flat=True)
            .first()
        )
        _record(
            task,
            run_id,
            item_id,
            ItemStatus.FAILED,
            error_class=qualified_name(type(exc)),
            message=str(exc),
            dead_letter_id=letter,
        )
    except Reject:
        logger.critical(
            "celery_guard: item %s of run %s failed (%s) and that could not be recorded; it "
            "stays running",
            item_id,
            run_id,
            qualified_name(type(exc)),
        )


def _record(
    task: Any,
    run_id: int,
    item_id: int,
    status: ItemStatus,
    *,
    error_class: str = "",
    message: str = "",
    dead_letter_id: int | None = None,
) -> None:
    try:
        moved, finished = services.finish_item(
            run_id,
            item_id,
            status,
            error_class=error_class,
            error_message=message,
            dead_letter_id=dead_letter_id,
        )
    except Exception as exc:
        logger.exception(
            "celery_guard: cannot record item %s of run %s as %s; leaving the message for "
            "redelivery",
            item_id,
            run_id,
            status,
        )
        raise Reject(exc, requeue=True) from exc
    if not moved:
        logger.info("celery_guard: item %s of run %s was final already", item_id, run_id)
    if finished:
        launch.complete_quietly(run_id)
