"""The failure pipeline of a running guarded task: classify, retry with backoff, dead-letter.

Runs inside the task call (``GuardedTask.__call__``), not in Celery signal receivers, whose
exceptions Celery swallows: a dead letter that cannot be written leaves the message for
redelivery instead of acknowledging it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import traceback as tb_module
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

from celery.exceptions import Ignore, Reject, Retry, TimeLimitExceeded, WorkerLostError
from django.utils.module_loading import import_string

from celery_guard.conf import guard_settings
from celery_guard.core import dbreuse, headers, options, pipeline, redaction
from celery_guard.dlq import records
from celery_guard.dlq.models import Reason
from celery_guard.exceptions import (
    HardTimeLimitError,
    InvalidHeaderError,
    PoisonMessageError,
    RepublishError,
)
from celery_guard.failures import deliveries, retry
from celery_guard.idempotency import dedup
from celery_guard.observability import events, sentry

logger = logging.getLogger(__name__)

#: Entries of the attempt history kept in the header (the oldest are dropped).
MAX_HISTORY = 25
#: Longest pause (seconds) before a message is requeued during an outage.
MAX_OUTAGE_PAUSE = 10.0
#: Longest task id a dead letter (and a delivery marker) stores.
MAX_TASK_ID = 255

#: Consecutive requeues of this worker process during an outage (for the backoff).
_outages = 0


def _number(guard: Mapping[str, Any], key: str, default: Any = 0) -> Any:
    # The header comes from the broker: a value of the wrong type must not break the pipeline.
    value = guard.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return default
    return int(value) if isinstance(default, int) else float(value)


def _history(guard: Mapping[str, Any]) -> list[Any]:
    value = guard.get(headers.HISTORY)
    return list(value) if isinstance(value, list) else []


def policy_for(task: Any) -> retry.Policy:
    """The effective failure policy of ``task`` under the current settings."""
    path = guard_settings.error_classifier
    classifier: Callable[[BaseException], Any] | None = None
    if path:
        try:
            classifier = import_string(path)
        except ImportError:
            logger.exception(
                "celery_guard: CELERY_GUARD_ERROR_CLASSIFIER %r cannot be imported (check "
                "celery_guard.E005); classifying without it",
                path,
            )
    return retry.policy_for(
        task.guard_options,
        unknown=guard_settings.unknown_errors,
        max_throttled=guard_settings.max_throttled,
        classifier=classifier,
    )


def _queue(request: Any) -> str:
    info = request.delivery_info or {}
    return str(info.get("routing_key") or info.get("queue") or "")


def _options(request: Any) -> dict[str, Any]:
    """The Celery publish options a replay needs (not ``expires``: it may have passed)."""
    found: dict[str, Any] = {}
    priority = (request.delivery_info or {}).get("priority")
    if priority is not None:
        found["priority"] = priority
    hard, soft = request.timelimit or (None, None)
    if hard is not None:
        found["time_limit"] = hard
    if soft is not None:
        found["soft_time_limit"] = soft
    return found


def _error_text(exc: BaseException) -> tuple[str, str, str]:
    name = retry.qualified_name(type(exc))
    text = "".join(tb_module.format_exception(type(exc), exc, exc.__traceback__))
    return name, str(exc), text


def dead_letter(
    task: Any,
    exc: BaseException,
    reason: str,
    *,
    attempts: int,
    history: Sequence[Mapping[str, Any]],
    guarded: bool = True,
) -> None:
    """Record the running request of ``task`` as a dead letter.

    When not even a minimal row can be written (the database is down), the message is kept:
    republished with a growing countdown, up to ``CELERY_GUARD_DEAD_LETTER_WRITE_TRIES``
    times; then the guard gives up on the record, logs the whole message at CRITICAL and
    returns.

    Raises:
        celery.exceptions.Retry: The message was republished to write the record later.
        celery.exceptions.Reject: With ``requeue=True`` when it could not even be republished.
    """
    request = task.request
    if _committed(task):
        logger.warning(
            "celery_guard: %s[%s] not dead-lettered (%s): its idempotency key already "
            "succeeded, so its effect committed",
            task.name,
            request.id,
            reason,
        )
        return
    name, message, text = _error_text(exc)
    failure = records.Failure(
        task_name=task.name,
        task_id=request.id,
        reason=reason,
        exception_class=name,
        message=message,
        traceback=text,
        queue=_queue(request),
        args=list(request.args or ()),
        kwargs=dict(request.kwargs or {}),
        headers=dict(request.headers or {}),
        options=_options(request),
        attempts=attempts,
        history=history,
        hostname=request.hostname or "",
        guarded=guarded,
        idempotency_key=dedup.context(request).key,
    )
    try:
        row = records.write(failure)
    except Exception as write_exc:
        _keep_unrecorded(task, failure, write_exc)
        return
    events.emit(
        "dead_lettered",
        reason=str(reason),
        error_class=name,
        attempts_used=attempts,
        dead_letter_id=row.pk,
    )
    event_id = sentry.capture_final(exc, reason=str(reason), dead_letter_id=row.pk, history=history)
    if event_id:
        records.set_sentry_event(row, event_id)


def _committed(task: Any) -> bool:
    """Whether the running request's key already succeeded (False when it cannot be told)."""
    try:
        return dedup.succeeded(task)
    except Exception:
        logger.warning(
            "celery_guard: could not ask the ledger whether %s[%s] already succeeded",
            task.name,
            task.request.id,
            exc_info=True,
        )
        return False


def requeue_after_outage(task: Any, error: BaseException) -> NoReturn:
    """Requeue the running message during an outage, after a pause that grows while it lasts.

    Raises:
        celery.exceptions.Reject: Always, with ``requeue=True``.
    """
    global _outages
    dbreuse.close_unusable()
    _outages += 1
    pause = min(0.25 * 2 ** min(_outages, 10), MAX_OUTAGE_PAUSE)
    logger.warning(
        "celery_guard: %s[%s]: %s: %s; requeueing it in %.2fs (outage %s of this process)",
        task.name,
        task.request.id,
        retry.qualified_name(type(error)),
        records.truncate(str(error), 200),
        pause,
        _outages,
    )
    time.sleep(pause)
    raise Reject(error, requeue=True) from error


def _keep_unrecorded(task: Any, failure: records.Failure, error: BaseException) -> None:
    request = task.request
    dbreuse.close_unusable()
    guard = headers.read(request.headers)
    count = _number(guard, headers.WRITE_FAILURES) + 1
    tries = guard_settings.dead_letter_write_tries
    if count > tries:
        records.give_up(failure, error, count - 1)
        return
    delay = min(2.0 ** (count - 1), 60.0)  # 1, 2, 4... 60 s: about 3 min in all
    new_guard = {**guard, headers.WRITE_FAILURES: count}
    try:
        again = task.signature_from_request(
            request,
            countdown=delay,
            retries=request.retries,
            headers={**(request.headers or {}), headers.HEADER: new_guard},
        )
        again.apply_async()
    except Exception as publish_exc:
        logger.error(
            "celery_guard: could not republish %s[%s] to write its dead letter later",
            task.name,
            request.id,
            exc_info=True,
        )
        requeue_after_outage(task, publish_exc)
    logger.error(
        "celery_guard: %s[%s]: dead letter not written (%s of %s); republished to try again "
        "in %.0fs",
        task.name,
        request.id,
        count,
        tries,
        delay,
    )
    raise Retry(f"dead letter not written: {error}", when=delay, sig=again)


def _entry(
    exc: BaseException, decision: retry.Decision, now: float, attempt: int
) -> dict[str, Any]:
    return {
        "at": now,
        "attempt": attempt,
        "error": retry.qualified_name(type(exc)),
        "message": records.truncate(str(exc), 300),
        "kind": decision.classification.kind,
        "delay": round(decision.delay, 3) if decision.retry else None,
    }


def handle(task: Any, exc: BaseException) -> NoReturn:
    """Retry or dead-letter the running request of ``task`` after ``exc``; always raises.

    Raises:
        celery.exceptions.Retry: A retry was published (same task id, guard header updated).
        celery.exceptions.Reject: With ``requeue=True``: publishing the retry or writing the
            dead letter failed, so the message stays on the broker.
        BaseException: ``exc`` itself once it has been dead-lettered.
    """
    request = task.request
    # Before anything formats the exception: the history entry, Celery's retry and failure
    # log lines and the dead letter then carry masked argument values (docs/dlq.md).
    redaction.scrub_exception(
        exc, redaction.secrets(request.args or (), request.kwargs or {}, task_name=task.name)
    )
    if retry.is_outage(exc):
        dbreuse.close_unusable()
    guard = headers.read(request.headers)
    now = time.time()
    policy = policy_for(task)
    try:
        classification = retry.classify(exc, policy, now=now)
    except Exception:
        logger.exception("celery_guard: the error classifier failed; using the unknown rule")
        classification = retry.Classification(policy.unknown, "unknown")
    decision = retry.decide(
        classification,
        policy,
        consumed_before=_number(guard, headers.CONSUMED),
        throttled_before=_number(guard, headers.THROTTLED),
        first_enqueued_at=_number(guard, "first_enqueued_at", None),
        now=now,
    )
    history = [*_history(guard), _entry(exc, decision, now, decision.consumed)]
    history = history[-MAX_HISTORY:]
    if decision.retry:
        logger.warning(
            "celery_guard: %s[%s] failed (%s, %s by %s rule): retry in %.3fs, attempts used "
            "%s of %s, throttled %s",
            task.name,
            request.id,
            retry.qualified_name(type(exc)),
            classification.kind,
            classification.rule,
            decision.delay,
            decision.consumed,
            policy.max_attempts,
            decision.throttled,
        )
        new_guard = {
            **guard,
            headers.CONSUMED: decision.consumed,
            headers.THROTTLED: decision.throttled,
            headers.HISTORY: history,
            headers.DELAY: decision.delay,
        }
        message_headers = {**(request.headers or {}), headers.HEADER: new_guard}
        try:
            task.retry(
                exc=exc,
                countdown=decision.delay,
                headers=message_headers,
                max_retries=request.retries + 1,
            )
        except Retry:
            events.emit(
                "retry_scheduled",
                error_class=retry.qualified_name(type(exc)),
                kind=classification.kind,
                delay=decision.delay,
                attempts_used=decision.consumed,
            )
            raise
        except Reject as rejected:
            # Celery drops the message when publishing a retry fails (Reject, requeue=False).
            cause = rejected.reason if isinstance(rejected.reason, BaseException) else rejected
            logger.error(
                "celery_guard: could not publish the retry of %s[%s]",
                task.name,
                request.id,
                exc_info=True,
            )
            if retry.is_outage(cause):
                events.emit("requeued", why="the retry could not be published")
                requeue_after_outage(task, cause)  # the broker (or ledger) comes back
            # A publish refused by the guard's own checks fails the same way every time.
            error = RepublishError(
                f"the retry after {retry.qualified_name(type(exc))} ({exc}) could not be "
                f"published: {retry.qualified_name(type(cause))}: {cause}"
            )
            error.__cause__ = cause
            dead_letter(
                task,
                error,
                Reason.REPUBLISH_FAILED,
                attempts=decision.consumed,
                history=history,
            )
            raise error from cause
        raise AssertionError("Task.retry returned")  # pragma: no cover
    reason = decision.reason or Reason.EXHAUSTED
    if reason == Reason.EXHAUSTED and isinstance(exc, TimeLimitExceeded):
        reason = Reason.TIMEOUT
    dead_letter(task, exc, reason, attempts=decision.consumed, history=history)
    if isinstance(exc, TimeLimitExceeded):
        raise HardTimeLimitError(f"killed at the hard time limit ({exc}); dead-lettered") from exc
    raise exc


#: Kombu transport driver types that flag every redelivered message (``redelivered``): the
#: AMQP protocol does, and kombu's Redis transport sets it whenever it restores a message.
FLAGS_REDELIVERIES = frozenset({"amqp", "redis"})
_flags_redeliveries: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


def flags_redeliveries(app: Any) -> bool:
    """Tell whether the broker of ``app`` flags redelivered messages (cached per app)."""
    known = _flags_redeliveries.get(app)
    if known is None:
        # A Connection object opens nothing until it is used.
        known = app.connection_for_read().transport.driver_type in FLAGS_REDELIVERIES
        _flags_redeliveries[app] = known
    return known


def _may_be_lost(task: Any, request: Any) -> bool:
    """Whether this delivery must read and keep a delivery marker (off the hot path).

    A first delivery cannot follow a lost one: the loss of a redelivered message is what
    the marker records. Only a broker that does not flag redeliveries needs it every time.
    """
    if (request.delivery_info or {}).get("redelivered"):
        return True
    return not flags_redeliveries(task.app)


def run(task: Any, body: Callable[[], Any], request: Any, guard: Mapping[str, Any]) -> Any:
    """Run one delivery of a guarded task through the failure pipeline.

    Args:
        task: The guarded task.
        body: Runs the steps inside and the task body (no arguments: they are bound in it).
        request: ``task.request`` of the delivery.
        guard: Its guard header.
    """
    global _outages
    found = _request_problems(request, guard)
    if found:
        _refuse(task, found)
    if _past_deadline(task, guard):
        _expire(task, guard)
    started: deliveries.Started | None = None
    try:
        if _may_be_lost(task, request):
            started = deliveries.begin(
                request.id, task.name, request.retries or 0, request.hostname or ""
            )
    except Exception as exc:
        logger.exception(
            "celery_guard: could not write the delivery marker of %s[%s]; running it without "
            "the poison-message cap",
            task.name,
            request.id,
        )
        if retry.is_outage(exc):
            dbreuse.close_unusable()
    if started is not None and started.lost:
        logger.warning(
            "celery_guard: %s[%s] redelivered after its worker process was lost (%s lost "
            "deliveries, CELERY_GUARD_MAX_WORKER_LOST=%s)",
            task.name,
            request.id,
            started.lost,
            guard_settings.max_worker_lost,
        )
        events.emit("worker_lost", lost=started.lost)
    if started is not None and started.lost:
        setattr(request, dedup.LOST_ATTR, started.lost)
    if started is not None and started.lost >= guard_settings.max_worker_lost:
        if _committed(task):
            # Its effect committed (the worker died after it): a skip, never a dead letter.
            logger.info(
                "celery_guard: %s[%s] skipped: its key already succeeded",
                task.name,
                request.id,
            )
            dedup.mark_skipped(request)
            deliveries.end(request.id, started.token)
            return None
        _poison(task, started)
    ended = False
    try:
        if started is not None and started.timed_out:
            # The previous delivery was killed at the hard time limit: that was an attempt.
            handle(task, TimeLimitExceeded((request.timelimit or (None, None))[0]))
        result = _call(task, body, request, guard)
        ended = True
        _outages = 0
        return result
    except Exception:
        ended = True
        raise
    finally:
        # Not on SystemExit and the like: the process is being stopped mid-run, so this
        # delivery is lost and its redelivery must count it.
        if started is not None and ended:
            try:
                deliveries.end(request.id, started.token)
            except Exception:
                logger.exception(
                    "celery_guard: could not delete the delivery marker of %s[%s]; its next "
                    "delivery will count as a lost one",
                    task.name,
                    request.id,
                )


def _call(task: Any, body: Callable[[], Any], request: Any, guard: Mapping[str, Any]) -> Any:
    try:
        return body()
    except (Retry, Ignore):
        raise
    except Reject as rejected:
        if not rejected.requeue:
            dead_letter(
                task,
                rejected,
                Reason.REJECTED,
                attempts=_number(guard, headers.CONSUMED) + 1,
                history=_history(guard),
            )
        raise
    except Exception as exc:
        handle(task, exc)


def _request_problems(request: Any, guard: Mapping[str, Any]) -> list[str]:
    found = headers.problems(guard)
    task_id = request.id
    if not isinstance(task_id, str) or len(task_id) > MAX_TASK_ID or "\x00" in task_id:
        found.append(f"task id: not a string of at most {MAX_TASK_ID} characters without NUL")
    return found


def _refuse(task: Any, found: Sequence[str]) -> NoReturn:
    """Dead-letter a message whose header the guard cannot trust, without running it."""
    exc = InvalidHeaderError(
        "the message carries values the guard never writes (forged or corrupt): "
        + "; ".join(records.truncate(problem, 200) for problem in found[:10])
    )
    logger.error("celery_guard: %s[%s] refused: %s", task.name, task.request.id, exc)
    dead_letter(task, exc, Reason.INVALID_HEADER, attempts=0, history=[])
    raise exc


def _past_deadline(task: Any, guard: Mapping[str, Any]) -> bool:
    # The deadline first: most tasks have none, and the header's number costs more to read.
    value = retry.DEADLINE.resolve({}, task.guard_options)
    if value is None:
        return False
    first = _number(guard, "first_enqueued_at", None)
    if first is None:
        return False
    deadline = options.validate_value(retry.DEADLINE, value, where="settings")
    return deadline is not None and time.time() > first + deadline


def _expire(task: Any, guard: Mapping[str, Any]) -> NoReturn:
    """Dead-letter a delivery that starts after its deadline, without running it."""
    first = _number(guard, "first_enqueued_at", 0.0)
    late = time.time() - first
    exc = TimeoutError(f"started {late:.1f}s after its first enqueue, past its deadline")
    history = [
        *_history(guard),
        {
            "at": time.time(),
            "attempt": _number(guard, headers.CONSUMED) + 1,
            "error": retry.qualified_name(TimeoutError),
            "message": str(exc),
            "kind": "deadline",
            "delay": None,
        },
    ][-MAX_HISTORY:]
    dead_letter(
        task, exc, Reason.DEADLINE, attempts=_number(guard, headers.CONSUMED), history=history
    )
    raise exc


def _poison(task: Any, started: deliveries.Started) -> NoReturn:
    request = task.request
    guard = headers.read(request.headers)
    exc = PoisonMessageError(
        f"{started.lost} deliveries of this message lost their worker process "
        f"(CELERY_GUARD_MAX_WORKER_LOST={guard_settings.max_worker_lost}); not running it again"
    )
    history = [
        *_history(guard),
        {
            "at": time.time(),
            "attempt": _number(guard, headers.CONSUMED) + 1,
            "error": "billiard.exceptions.WorkerLostError",
            "message": f"worker lost {started.lost} times",
            "kind": "worker_lost",
            "delay": None,
        },
    ][-MAX_HISTORY:]
    dead_letter(
        task,
        exc,
        Reason.WORKER_LOST,
        attempts=_number(guard, headers.CONSUMED) + 1,
        history=history,
    )
    deliveries.end(request.id, started.token)
    raise exc


def on_hard_timeout(task_name: str, task_id: str, retries: int, hostname: str) -> None:
    """Main-process hook: the pool killed the delivery of ``task_id`` at its hard time limit.

    Celery requeues the message (guarded tasks set ``acks_on_timeout = False``); the marker
    makes its next delivery count the kill as a failed attempt instead of running.
    """
    try:
        deliveries.mark_timed_out(task_id, task_name, retries, hostname)
    except Exception:
        logger.exception(
            "celery_guard: could not mark %s[%s] as timed out; its redelivery will run as if "
            "it had not been killed",
            task_name,
            task_id,
        )
        dbreuse.close_unusable()


def on_worker_lost(task_name: str, task_id: str, retries: int, hostname: str) -> None:
    """Main-process hook: the delivery of ``task_id`` lost its worker process.

    Called before Celery requeues the message, so whichever worker gets the redelivery sees
    the count (the poison-message cap, ``CELERY_GUARD_MAX_WORKER_LOST``).
    """
    try:
        deliveries.record_lost(task_id, task_name, retries, hostname)
    except Exception:
        logger.exception(
            "celery_guard: could not count the lost delivery of %s[%s] (poison-message cap)",
            task_name,
            task_id,
        )
        dbreuse.close_unusable()


def capture_unguarded(sender: Any, task_id: str, exception: BaseException, **kw: Any) -> None:
    """``task_failure`` receiver: record a failed unguarded task (best effort, logged)."""
    if not guard_settings.capture_unguarded or pipeline.is_guarded(sender):
        return
    if isinstance(exception, TimeLimitExceeded):
        reason = Reason.TIMEOUT
    elif isinstance(exception, WorkerLostError):
        reason = Reason.WORKER_LOST
    elif isinstance(exception, Reject):
        reason = Reason.REJECTED
    else:
        reason = Reason.FAILED
    request = getattr(sender, "request", None)
    name, message, text = _error_text(exception)
    einfo = kw.get("einfo")
    failure = records.Failure(
        task_name=getattr(sender, "name", str(sender)),
        task_id=task_id,
        reason=reason,
        exception_class=name,
        message=message,
        traceback=str(getattr(einfo, "traceback", "") or text),
        queue=_queue(request) if request is not None else "",
        args=list(kw.get("args") or ()),
        kwargs=dict(kw.get("kwargs") or {}),
        headers=dict(getattr(request, "headers", None) or {}),
        options=_options(request) if request is not None else {},
        attempts=int(getattr(request, "retries", 0) or 0) + 1,
        hostname=getattr(request, "hostname", "") or "",
        guarded=False,
    )
    # write() logs and counts a failure; Celery's signal dispatch would swallow it anyway.
    with contextlib.suppress(Exception):
        records.write(failure)
