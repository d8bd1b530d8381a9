"""``CELERY_GUARD_SLOS``: objectives per task or queue, parsed and validated.

::

    CELERY_GUARD_SLOS = {
        "billing.tasks.charge": {"start_within": 30, "success_share": 0.99},
        "queue:default": {"start_within": 60, "dlq_per_hour": 10, "hold": 5, "window": 15},
        "billing.tasks.reprice": {"progress_within": 600},
        "beat:nightly-report": {"fire_within": 120},
    }

A key is a task name, ``"queue:<name>"`` for every task of a queue, or ``"beat:<entry>"``
for a guarded beat entry. Objectives: ``start_within`` (seconds: the p95 of the lag from
publish to start may not exceed it), ``success_share`` (0-1: succeeded / (succeeded +
dead-lettered) may not fall below it), ``dlq_per_hour`` (dead letters per hour may not exceed
it), ``progress_within`` (task keys only, seconds: no unfinished bulk run of the task may go
longer without an item finishing) and ``fire_within`` (beat keys only, seconds: no slot of the
entry may be published later than this after its due time, nor stay unpublished longer).
``window`` (minutes, default 15) is the stretch of rollups (or fire records) each figure is
computed over; ``hold`` (minutes, default 5, 0 allowed) is how long a breach must last before
an alert is raised. Durations go through :mod:`celery_guard.durations`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from celery_guard import durations

#: Objective name -> (what breaches it, its playbook anchor in docs/observability.md).
OBJECTIVES: Mapping[str, tuple[str, str]] = {
    "start_within": ("above", "playbook-lag"),
    "success_share": ("below", "playbook-failures"),
    "dlq_per_hour": ("above", "playbook-dead-letters"),
    "progress_within": ("above", "playbook-stalled-runs"),
    "fire_within": ("above", "playbook-missed-slots"),
}
#: Objectives that are durations in seconds (checked by the shared validator).
SECONDS = frozenset({"start_within", "progress_within", "fire_within"})
OPTIONS = ("window", "hold")
DEFAULT_WINDOW = 15.0
DEFAULT_HOLD = 5.0
QUEUE_PREFIX = "queue:"
BEAT_PREFIX = "beat:"
#: Kind of key -> the objectives it may have.
ALLOWED: Mapping[str, frozenset[str]] = {
    "task_name": frozenset({"start_within", "success_share", "dlq_per_hour", "progress_within"}),
    "queue": frozenset({"start_within", "success_share", "dlq_per_hour"}),
    "beat": frozenset({"fire_within"}),
}


def kind(key: str) -> str:
    """``"queue"``, ``"beat"`` or ``"task_name"``: what an SLO key names."""
    if key.startswith(QUEUE_PREFIX):
        return "queue"
    if key.startswith(BEAT_PREFIX):
        return "beat"
    return "task_name"


@dataclass(frozen=True)
class Objective:
    """One objective of one SLO key."""

    slo: str
    name: str
    threshold: float
    window: float
    hold: float

    @property
    def by(self) -> str:
        """``"queue"``, ``"task_name"`` (what the rollups are summed by) or ``"beat"``."""
        return kind(self.slo)

    @property
    def subject(self) -> str:
        """The queue, task name or beat entry the objective is about."""
        if self.by == "task_name":
            return self.slo
        return self.slo.split(":", 1)[1]

    def breached(self, value: float | None) -> bool:
        """Whether ``value`` breaches the objective (no data never does)."""
        if value is None:
            return False
        direction, _ = OBJECTIVES[self.name]
        return value > self.threshold if direction == "above" else value < self.threshold


def errors(value: Any) -> Iterator[str]:
    """What is wrong with a ``CELERY_GUARD_SLOS`` value (nothing when it is valid)."""
    if not isinstance(value, Mapping):
        yield f"CELERY_GUARD_SLOS must be a dict, not {type(value).__name__}"
        return
    for key, spec in value.items():
        where = f"CELERY_GUARD_SLOS[{key!r}]"
        if not isinstance(key, str) or not key or key in (QUEUE_PREFIX, BEAT_PREFIX):
            yield f"{where}: the key must be a task name, 'queue:<name>' or 'beat:<entry>'"
            continue
        if not isinstance(spec, Mapping):
            yield f"{where} must be a dict of objectives, not {type(spec).__name__}"
            continue
        if not set(spec) & set(OBJECTIVES):
            yield f"{where} names no objective (one of {', '.join(OBJECTIVES)})"
        for name, number in spec.items():
            if name not in OBJECTIVES and name not in OPTIONS:
                known = ", ".join((*OBJECTIVES, *OPTIONS))
                yield f"{where}: unknown objective {name!r} (known: {known})"
            elif name in OBJECTIVES and name not in ALLOWED[kind(key)]:
                allowed = ", ".join(sorted(ALLOWED[kind(key)]))
                yield f"{where}: {name!r} does not apply to this key (it takes: {allowed})"
            else:
                yield from _value_errors(where, name, number)


def _value_errors(where: str, name: str, number: Any) -> Iterator[str]:
    bounds: dict[str, Any] | None = None
    if name in SECONDS:
        bounds = {}
    elif name in OPTIONS:
        # Minutes; a hold of 0 raises on the first breach.
        bounds = {
            "unit": "minutes",
            "maximum": durations.MAX_SECONDS / 60,
            "allow_minimum": name == "hold",
        }
    if bounds is not None:
        try:
            durations.seconds(number, **bounds)
        except (TypeError, ValueError) as exc:
            yield f"{where}[{name!r}] {exc}"
    elif isinstance(number, bool) or not isinstance(number, (int, float)):
        yield f"{where}[{name!r}] must be a number >= 0, not {number!r}"
    elif not math.isfinite(number) or number < 0:
        yield f"{where}[{name!r}] must be a finite number >= 0, not {number!r}"
    elif name == "success_share" and number > 1:
        yield f"{where}['success_share'] is a share between 0 and 1, not {number!r}"


def objectives(value: Mapping[str, Mapping[str, Any]]) -> list[Objective]:
    """The objectives of a valid ``CELERY_GUARD_SLOS`` (invalid entries are skipped)."""
    if list(errors(value)):
        value = {k: v for k, v in value.items() if not list(errors({k: v}))}
    found = []
    for key, spec in value.items():
        window = _number(spec.get("window", DEFAULT_WINDOW))
        hold = _number(spec.get("hold", DEFAULT_HOLD))
        for name in OBJECTIVES:
            if name in spec:
                found.append(Objective(key, name, _number(spec[name]), window, hold))
    return found


def _number(value: Any) -> float:
    # A timedelta where a duration is expected (validated above): its seconds.
    return value.total_seconds() if isinstance(value, timedelta) else float(value)
