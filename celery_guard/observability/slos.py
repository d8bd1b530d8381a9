"""``CELERY_GUARD_SLOS``: objectives per task or queue, parsed and validated.

::

    CELERY_GUARD_SLOS = {
        "billing.tasks.charge": {"start_within": 30, "success_share": 0.99},
        "queue:default": {"start_within": 60, "dlq_per_hour": 10, "hold": 5, "window": 15},
    }

A key is a task name, or ``"queue:<name>"`` for every task of a queue. Objectives:
``start_within`` (seconds: the p95 of the lag from publish to start may not exceed it),
``success_share`` (0-1: succeeded / (succeeded + dead-lettered) may not fall below it) and
``dlq_per_hour`` (dead letters per hour may not exceed it). ``window`` (minutes, default 15)
is the stretch of rollups each figure is computed over; ``hold`` (minutes, default 5) is how
long a breach must last before an alert is raised.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

#: Objective name -> (what breaches it, its playbook anchor in docs/observability.md).
OBJECTIVES: Mapping[str, tuple[str, str]] = {
    "start_within": ("above", "playbook-lag"),
    "success_share": ("below", "playbook-failures"),
    "dlq_per_hour": ("above", "playbook-dead-letters"),
}
OPTIONS = ("window", "hold")
DEFAULT_WINDOW = 15.0
DEFAULT_HOLD = 5.0
QUEUE_PREFIX = "queue:"


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
        """``"queue"`` or ``"task_name"``: what the rollups are summed by."""
        return "queue" if self.slo.startswith(QUEUE_PREFIX) else "task_name"

    @property
    def subject(self) -> str:
        """The queue or task name the objective is about."""
        return self.slo[len(QUEUE_PREFIX) :] if self.by == "queue" else self.slo

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
        if not isinstance(key, str) or not key or key == QUEUE_PREFIX:
            yield f"{where}: the key must be a task name or 'queue:<name>'"
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
            elif isinstance(number, bool) or not isinstance(number, (int, float)) or number < 0:
                yield f"{where}[{name!r}] must be a number >= 0, not {number!r}"
            elif name == "success_share" and number > 1:
                yield f"{where}['success_share'] is a share between 0 and 1, not {number!r}"


def objectives(value: Mapping[str, Mapping[str, Any]]) -> list[Objective]:
    """The objectives of a valid ``CELERY_GUARD_SLOS`` (invalid entries are skipped)."""
    if list(errors(value)):
        value = {k: v for k, v in value.items() if not list(errors({k: v}))}
    found = []
    for key, spec in value.items():
        window = float(spec.get("window", DEFAULT_WINDOW))
        hold = float(spec.get("hold", DEFAULT_HOLD))
        for name in OBJECTIVES:
            if name in spec:
                found.append(Objective(key, name, float(spec[name]), window, hold))
    return found
