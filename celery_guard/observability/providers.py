"""Figures other features know how to read (dead letters, the beat lease, stalled bulk runs,
late beat slots), registered by them.

Observability sits below the dlq, beat and runs features, so it cannot import their models; each
feature registers a reader here from its ``receivers.connect()``, and the metrics endpoint,
the dashboard, the status command and the SLO evaluator call them.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeadLetterCount:
    """Open dead letters of one task on one queue."""

    task_name: str
    queue: str
    count: int


@dataclass(frozen=True)
class Leader:
    """The beat lease of one lock: who holds it (``None``: nobody) and its token."""

    lock: str
    holder: str | None
    token: int | None


_readers: dict[str, Callable[..., Any]] = {}


def register(name: str, reader: Callable[..., Any]) -> None:
    """Register the reader of figure ``name`` (``"dead_letters"``, ``"beat_leaders"``,
    ``"run_stall"``, ``"slot_lateness"``)."""
    _readers[name] = reader


def dead_letters() -> list[DeadLetterCount]:
    """Open dead letters by task and queue (empty when the dlq feature registered none)."""
    return list(_call("dead_letters") or [])


def beat_leaders() -> list[Leader]:
    """The beat leases and their holders."""
    return list(_call("beat_leaders") or [])


def run_stall(task_name: str, now: dt.datetime) -> float | None:
    """Seconds the most stalled unfinished bulk run of ``task_name`` went without an item
    finishing (``None``: no unfinished run, or the runs feature registered no reader)."""
    value = _call("run_stall", task_name, now)
    return None if value is None else float(value)


def slot_lateness(entry: str, since: dt.datetime, now: dt.datetime) -> float | None:
    """Seconds the latest-published (or still unpublished) slot of beat entry ``entry``
    since ``since`` was late (``None``: no such entry, or no reader registered)."""
    value = _call("slot_lateness", entry, since, now)
    return None if value is None else float(value)


def _call(name: str, *args: Any) -> Any:
    reader = _readers.get(name)
    if reader is None:
        return None
    try:
        return reader(*args)
    except Exception:
        logger.warning("celery_guard: could not read %s", name, exc_info=True)
        return None
