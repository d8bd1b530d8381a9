"""Structured logs: one record per guard event on the ``celery_guard`` logger.

Every record carries the event's fields in ``extra`` (``record.event``, ``record.task_id``,
``record.request_id``...), so any formatter can use them; :class:`JsonFormatter` writes one
line of JSON per record (it needs the ``json`` extra: ``python-json-logger``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from celery_guard.observability.events import Event

#: The logger of every event record.
logger = logging.getLogger("celery_guard")

#: Attributes of ``LogRecord``: an event field of the same name would clash with them.
RESERVED = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}

#: Fields that make up the message text (the rest are in ``extra`` only).
_SUMMARY = ("reason", "error_class", "kind", "delay", "duration", "lag", "where", "limit")


def record_extra(event: Event, fields: Mapping[str, Any]) -> dict[str, Any]:
    """The ``extra`` of an event's record: ``event`` and every field that has a value."""
    extra: dict[str, Any] = {"event": event.name}
    for key, value in fields.items():
        if value is not None:
            extra[f"cg_{key}" if key in RESERVED else key] = value
    return extra


def _message(event: Event, fields: Mapping[str, Any]) -> str:
    task = fields.get("task_name")
    head = f"celery_guard: {event.name}"
    if task:
        head += f" {task}[{fields.get('task_id')}]"
    parts = []
    for key in _SUMMARY:
        value = fields.get(key)
        if value is not None:
            parts.append(f"{key}={value:.3f}" if isinstance(value, float) else f"{key}={value}")
    return f"{head} {' '.join(parts)}" if parts else head


def log_event(event: Event, fields: Mapping[str, Any]) -> None:
    """Subscriber: write the event's record (nothing when its level is disabled)."""
    if not logger.isEnabledFor(event.level):
        return
    logger.log(event.level, _message(event, fields), extra=record_extra(event, fields))


def _json_base() -> type[logging.Formatter]:
    try:
        from pythonjsonlogger.json import JsonFormatter as Base
    except ImportError:  # pragma: no cover - the optional extra is missing
        return logging.Formatter
    return Base


class JsonFormatter(_json_base()):  # type: ignore[misc]
    """One line of JSON per record, the event fields as keys (``python-json-logger``).

    Use it in ``LOGGING``::

        "formatters": {"json": {"()": "celery_guard.observability.logs.JsonFormatter"}}
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if _json_base() is logging.Formatter:
            raise ImportError(
                "celery_guard's JsonFormatter needs python-json-logger: "
                "pip install 'celery-guard[json]'"
            )
        kwargs.setdefault("fmt", "%(asctime)s %(levelname)s %(name)s %(message)s")
        super().__init__(*args, **kwargs)
