"""Writing dead-letter rows: one per final failure, logged loudly, never dropped silently."""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from celery_guard.core import headers
from celery_guard.signals import dead_lettered

if TYPE_CHECKING:
    from celery_guard.dlq.models import DeadLetter

logger = logging.getLogger(__name__)

#: Longest stored exception message and traceback (characters).
MAX_MESSAGE = 2000
MAX_TRACEBACK = 20000

_lock = threading.Lock()
_counts = {"written": 0, "write_failures": 0}


def counts() -> dict[str, int]:
    """Dead letters written and writes that failed in this process (for metrics)."""
    with _lock:
        return dict(_counts)


def _count(name: str) -> None:
    with _lock:
        _counts[name] += 1


def truncate(text: str, limit: int) -> str:
    """Cut ``text`` to ``limit`` characters, saying how much was cut."""
    if len(text) <= limit:
        return text
    return text[:limit] + f"... [{len(text) - limit} characters cut]"


def jsonable(value: Any) -> Any:
    """``value`` if it encodes as JSON, else its ``repr`` (unguarded tasks may use pickle)."""
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)
    return value


def replay_of(guard: Mapping[str, Any]) -> int | None:
    """Id of the dead letter a replayed message replays (guard header ``replay_of``), if any."""
    value = guard.get("replay_of")
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value


def idempotency_key(guard: Mapping[str, Any]) -> str | None:
    """The idempotency key a guard header carries (``{"idempotency": {"key": ...}}``), if any."""
    entry = guard.get("idempotency")
    if isinstance(entry, Mapping) and entry.get("key"):
        return str(entry["key"])[:255]
    return None


@dataclass
class Failure:
    """A final failure to record: the message, the error and the attempts that led to it."""

    task_name: str
    task_id: str
    reason: str
    exception_class: str
    message: str
    traceback: str = ""
    queue: str = ""
    args: Sequence[Any] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    headers: Mapping[str, Any] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)
    attempts: int = 0
    history: Sequence[Mapping[str, Any]] = ()
    hostname: str = ""
    guarded: bool = True


def write(failure: Failure) -> DeadLetter:
    """Write the dead-letter row, log it at ERROR and send ``dead_lettered``.

    Raises:
        Exception: Whatever the database raised; the failure is logged and counted first, and
            the caller must then leave the message for redelivery.
    """
    from celery_guard.dlq.models import DeadLetter

    guard = headers.read(failure.headers)
    first = guard.get("first_enqueued_at")
    try:
        row: DeadLetter = DeadLetter.objects.create(
            task_name=failure.task_name,
            task_id=failure.task_id,
            queue=failure.queue or "",
            args=jsonable(list(failure.args)),
            kwargs=jsonable(dict(failure.kwargs)),
            headers=jsonable(dict(failure.headers)),
            options=jsonable(dict(failure.options)),
            idempotency_key=idempotency_key(guard),
            tenant=guard.get("tenant"),
            replay_of=replay_of(guard),
            reason=failure.reason,
            exception_class=failure.exception_class[:255],
            message=truncate(failure.message, MAX_MESSAGE),
            traceback=truncate(failure.traceback, MAX_TRACEBACK),
            attempts=failure.attempts,
            history=jsonable(list(failure.history)),
            first_enqueued_at=(
                dt.datetime.fromtimestamp(first, dt.timezone.utc)
                if isinstance(first, (int, float))
                else None
            ),
            hostname=failure.hostname or "",
            guarded=failure.guarded,
        )
    except Exception:
        _count("write_failures")
        logger.critical(
            "celery_guard: could NOT write the dead letter of %s[%s] (reason %s, %s: %s)",
            failure.task_name,
            failure.task_id,
            failure.reason,
            failure.exception_class,
            truncate(failure.message, 200),
            exc_info=True,
        )
        raise
    _count("written")
    logger.error(
        "celery_guard: dead-lettered %s[%s]: reason %s after %s attempt(s): %s: %s "
        "(dead letter %s)",
        failure.task_name,
        failure.task_id,
        failure.reason,
        failure.attempts,
        failure.exception_class,
        truncate(failure.message, 200),
        row.pk,
    )
    for receiver, result in dead_lettered.send_robust(
        sender=DeadLetter,
        dead_letter=row,
        task_name=row.task_name,
        task_id=row.task_id,
        idempotency_key=row.idempotency_key,
        reason=row.reason,
    ):
        if isinstance(result, Exception):
            logger.error(
                "celery_guard: dead_lettered receiver %r failed for %s[%s]",
                receiver,
                row.task_name,
                row.task_id,
                exc_info=result,
            )
    return row
