"""Writing dead-letter rows: one per final failure, logged loudly, never dropped silently."""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from celery_guard.core import headers, redaction
from celery_guard.signals import dead_lettered

if TYPE_CHECKING:
    from celery_guard.dlq.models import DeadLetter

logger = logging.getLogger(__name__)

#: Longest stored exception message and traceback (characters).
MAX_MESSAGE = 2000
MAX_TRACEBACK = 20000
#: What a NUL character is stored as in text and JSON fields (PostgreSQL cannot store NUL).
NUL_ESCAPE = "\\u0000"
#: Largest attempt count a row stores (a PositiveIntegerField).
MAX_ATTEMPTS = 2**31 - 1

_lock = threading.Lock()
_counts = {"written": 0, "write_failures": 0, "given_up": 0}


def counts() -> dict[str, int]:
    """Dead letters written, writes that failed and records given up, in this process."""
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


def clean_text(text: str) -> str:
    """``text`` without NUL characters (escaped as ``\\u0000``), which PostgreSQL refuses."""
    return text.replace("\x00", NUL_ESCAPE) if "\x00" in text else text


def _clean(value: Any, depth: int = 0) -> Any:
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if depth > 100:
        return repr(value)[:200]
    if isinstance(value, Mapping):
        return {clean_text(str(k)): _clean(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(item, depth + 1) for item in value]
    return value


def storable(value: Any) -> tuple[Any, bool]:
    """``value`` as JSON a database column can hold, and whether it had to be changed.

    NUL characters (refused by PostgreSQL's ``jsonb``) are escaped as the text ``\\u0000``,
    non-finite numbers become ``null`` and values that are not JSON their ``repr``.
    """
    value = jsonable(value)
    try:
        text = json.dumps(value, allow_nan=False)
    except ValueError:
        return _clean(value), True
    if "\\u0000" not in text:
        return value, False
    cleaned = _clean(value)
    return cleaned, cleaned != value


def replay_of(guard: Mapping[str, Any]) -> int | None:
    """Id of the dead letter a replayed message replays (guard header ``replay_of``), if any."""
    value = guard.get("replay_of")
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 2**63:
        return None
    return value


def idempotency_key(guard: Mapping[str, Any]) -> str | None:
    """The idempotency key a guard header carries (``{"idempotency": {"key": ...}}``), if any."""
    entry = guard.get("idempotency")
    if isinstance(entry, Mapping) and entry.get("key"):
        return clean_text(str(entry["key"]))[:255]
    return None


def masked_history(history: Sequence[Any], hidden: frozenset[str]) -> list[Any]:
    """The attempt history with ``hidden`` values masked in each entry's message."""
    return [
        {**entry, "message": redaction.mask_text(entry["message"], hidden)}
        if isinstance(entry, Mapping) and isinstance(entry.get("message"), str)
        else entry
        for entry in history
    ]


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
    #: The key of the run when it differs from the header's (derived on the worker).
    idempotency_key: str | None = None


def _first_enqueued(guard: Mapping[str, Any]) -> dt.datetime | None:
    first = guard.get("first_enqueued_at")
    if isinstance(first, bool) or not isinstance(first, (int, float)):
        return None
    if not (math.isfinite(first) and 0 <= first <= headers.MAX_TIMESTAMP):
        return None
    return dt.datetime.fromtimestamp(first, dt.timezone.utc)


def _text(value: Any, limit: int = 255) -> str:
    return clean_text(str(value or ""))[:limit]


def _row_fields(failure: Failure) -> dict[str, Any]:
    """The row's fields, each made storable: NUL escaped, text cut, numbers clamped."""
    guard = headers.read(failure.headers) if isinstance(failure.headers, Mapping) else {}
    changed: list[str] = []
    stored: dict[str, Any] = {}
    for name, value in (
        ("args", list(failure.args)),
        ("kwargs", dict(failure.kwargs)),
        ("headers", dict(failure.headers)),
        ("options", dict(failure.options)),
        ("history", list(failure.history)),
    ):
        stored[name], was_changed = storable(value)
        if was_changed:
            changed.append(name)
    tenant = guard.get("tenant")
    key = failure.idempotency_key or idempotency_key(guard)
    return {
        **stored,
        "task_name": _text(failure.task_name),
        "task_id": _text(failure.task_id),
        "queue": _text(failure.queue),
        "idempotency_key": _text(key) if key else None,
        "tenant": _text(tenant) if isinstance(tenant, str) else None,
        "replay_of": replay_of(guard),
        "reason": failure.reason,
        "exception_class": _text(failure.exception_class),
        "message": truncate(clean_text(failure.message), MAX_MESSAGE),
        "traceback": truncate(clean_text(failure.traceback), MAX_TRACEBACK),
        "attempts": min(max(int(failure.attempts), 0), MAX_ATTEMPTS),
        "first_enqueued_at": _first_enqueued(guard),
        "hostname": _text(failure.hostname),
        "guarded": failure.guarded,
        "status_reason": (
            f"stored sanitized ({', '.join(changed)}): NUL characters escaped as "
            f"{NUL_ESCAPE}, non-finite numbers stored as null"
            if changed
            else ""
        ),
    }


def _minimal_fields(
    failure: Failure, error: BaseException, hidden: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """A last-resort row: the failure and the raw message as text, no JSON to refuse.

    The raw message is text here, not arguments kept for a replay: the ``hidden`` argument
    values are masked in it like in the rest of the row's text.
    """
    raw = redaction.mask_text(
        repr(
            {
                "args": failure.args,
                "kwargs": failure.kwargs,
                "headers": failure.headers,
                "options": failure.options,
            }
        ),
        hidden,
    )
    return {
        "task_name": _text(failure.task_name),
        "task_id": _text(failure.task_id),
        "queue": _text(failure.queue),
        "reason": failure.reason,
        "exception_class": _text(failure.exception_class),
        "message": truncate(clean_text(failure.message), MAX_MESSAGE),
        "traceback": truncate(
            clean_text(f"raw message:\n{raw}\n\n{failure.traceback}"), MAX_TRACEBACK
        ),
        "attempts": min(max(int(failure.attempts), 0), MAX_ATTEMPTS),
        "hostname": _text(failure.hostname),
        "guarded": failure.guarded,
        "status_reason": truncate(
            clean_text(
                "minimal record: the full dead letter could not be stored "
                f"({type(error).__name__}: {error}); the message is in the traceback field "
                "and cannot be replayed as is"
            ),
            MAX_MESSAGE,
        ),
    }


def write(failure: Failure) -> DeadLetter:
    """Write the dead-letter row, log it at ERROR and send ``dead_lettered``.

    Values no column can hold are made storable first (see :func:`storable`); if the row is
    still refused, a minimal row with the raw message as text is written instead.

    Raises:
        Exception: Whatever the database raised for the minimal row too; the failures are
            logged and counted first, and the caller must then keep the message.
    """
    from celery_guard.dlq.models import DeadLetter

    # The arguments are stored as sent (a replay needs them); their masked values are masked
    # in the free text before it is stored or logged (before it is cut, so no half is left).
    hidden = redaction.secrets(failure.args, failure.kwargs, task_name=failure.task_name)
    failure = replace(
        failure,
        message=redaction.mask_text(failure.message, hidden),
        traceback=redaction.mask_text(failure.traceback, hidden),
        history=masked_history(failure.history, hidden),
    )
    try:
        row: DeadLetter = DeadLetter.objects.create(**_row_fields(failure))
    except Exception as exc:
        _count("write_failures")
        logger.critical(
            "celery_guard: could NOT write the dead letter of %s[%s] (reason %s, %s: %s); "
            "writing a minimal record",
            failure.task_name,
            failure.task_id,
            failure.reason,
            failure.exception_class,
            truncate(failure.message, 200),
            exc_info=True,
        )
        try:
            row = DeadLetter.objects.create(**_minimal_fields(failure, exc, hidden))
        except Exception:
            logger.critical(
                "celery_guard: could NOT write a minimal dead letter of %s[%s] either",
                failure.task_name,
                failure.task_id,
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


def give_up(failure: Failure, error: BaseException, tries: int) -> None:
    """Log a failure whose dead letter could not be written in ``tries`` deliveries.

    The last record left: the whole message at CRITICAL, counted as ``given_up``.
    """
    _count("given_up")
    message = {
        "task_name": failure.task_name,
        "task_id": failure.task_id,
        "queue": failure.queue,
        "args": failure.args,
        "kwargs": failure.kwargs,
        "headers": failure.headers,
        "options": failure.options,
    }
    logger.critical(
        "celery_guard: GAVE UP recording the dead letter of %s[%s] after %s deliveries could "
        "not write it (last error %s: %s); reason %s, %s: %s; the message: %s",
        failure.task_name,
        failure.task_id,
        tries,
        type(error).__name__,
        truncate(str(error), 500),
        failure.reason,
        failure.exception_class,
        truncate(failure.message, 500),
        json.dumps(jsonable(message), default=repr),
    )


def set_sentry_event(row: DeadLetter, event_id: str) -> None:
    """Record the Sentry event of a dead letter (logged, never raised: the row is written)."""
    from celery_guard.dlq.models import DeadLetter

    try:
        DeadLetter.objects.filter(pk=row.pk).update(sentry_event_id=event_id[:64])
    except Exception:
        logger.exception(
            "celery_guard: could not store Sentry event %s on dead letter %s", event_id, row.pk
        )
        return
    row.sentry_event_id = event_id[:64]
