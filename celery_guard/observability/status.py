"""The figures an on-call engineer looks at first: the dashboard's and ``celery_guard status``.

Read from the broker (depth, oldest age), the rollups (lag p95, throughput, failure share
over the last hour), the dead letters and the beat lease (through the providers) and the open
alerts. Works without Prometheus.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass, field
from typing import Any

from celery import current_app
from django.utils import timezone

from celery_guard.conf import guard_settings
from celery_guard.observability import broker, metrics, providers, rollups, slos
from celery_guard.observability.models import OPEN_ALERT_STATUSES, Alert, AlertStatus

#: Minutes the dashboard's figures cover.
HOUR = 60
#: Failure share (retries and dead letters over attempts) from which a queue is amber.
AMBER_FAILURE_SHARE = 0.05
#: Share of the lag objective from which a queue is amber.
AMBER_LAG_SHARE = 0.8

GREEN, AMBER, RED = "green", "amber", "red"


@dataclass
class QueueFigures:
    """One queue's row of the dashboard."""

    queue: str
    depth: int | None
    oldest_age: float | None
    lag_p95: float | None
    lag_objective: float | None
    throughput: int
    failure_share: float | None
    dead_letters: int
    health: str = GREEN
    #: Finished deliveries per minute over the hour, oldest first (the chart).
    per_minute: list[int] = field(default_factory=list)
    #: Failure share per minute (``None`` for a minute without attempts).
    failures_per_minute: list[float | None] = field(default_factory=list)


@dataclass
class Figures:
    """Everything the dashboard shows."""

    at: dt.datetime
    queues: list[QueueFigures]
    dead_letters: list[providers.DeadLetterCount]
    leaders: list[providers.Leader]
    alerts: list[dict[str, Any]]

    def as_json(self) -> dict[str, Any]:
        """Plain data (``--json``)."""
        data = asdict(self)
        data["at"] = self.at.isoformat()
        return data


def _lag_objectives() -> dict[str, float]:
    found = {}
    for objective in slos.objectives(guard_settings.slos):
        if objective.name == "start_within" and objective.by == "queue":
            found[objective.subject] = objective.threshold
    return found


def health(row: QueueFigures, firing: set[str]) -> str:
    """Red: a firing alert on the queue or its lag p95 above its objective; amber: close to
    it, a backlog older than the objective, or 5%+ of attempts failing; else green."""
    objective = row.lag_objective
    if row.queue in firing or (
        objective is not None and row.lag_p95 is not None and row.lag_p95 > objective
    ):
        return RED
    if objective is not None and (
        (row.lag_p95 is not None and row.lag_p95 > AMBER_LAG_SHARE * objective)
        or (row.oldest_age is not None and row.oldest_age > objective)
    ):
        return AMBER
    if row.failure_share is not None and row.failure_share >= AMBER_FAILURE_SHARE:
        return AMBER
    return GREEN


def figures(now: dt.datetime | None = None) -> Figures:
    """Read every figure once."""
    now = now or timezone.now()
    since = now - dt.timedelta(minutes=HOUR)
    states = {s.queue: s for s in broker.read(str(current_app.conf.broker_url), metrics.queues())}
    hour = rollups.window(since, by="queue")
    minutes = rollups.per_minute(since, by="queue")
    dead = providers.dead_letters()
    dead_by_queue: dict[str, int] = {}
    for count in dead:
        dead_by_queue[count.queue] = dead_by_queue.get(count.queue, 0) + count.count
    open_alerts = list(Alert.objects.filter(status__in=OPEN_ALERT_STATUSES))
    firing = {
        a.slo[len(slos.QUEUE_PREFIX) :]
        for a in open_alerts
        if a.status == AlertStatus.FIRING and a.slo.startswith(slos.QUEUE_PREFIX)
    }
    objectives = _lag_objectives()
    start = rollups._minute(since.timestamp())
    slots = [start + dt.timedelta(minutes=i) for i in range(1, HOUR + 1)]
    rows = []
    for queue in dict.fromkeys([*states, *(q for q in hour if q)]):
        state = states.get(queue)
        window = hour.get(queue, rollups.Window())
        series = minutes.get(queue, {})
        row = QueueFigures(
            queue=queue,
            depth=state.depth if state else None,
            oldest_age=state.oldest_age if state else None,
            lag_p95=window.lag_p95(),
            lag_objective=objectives.get(queue),
            throughput=window.finished(),
            failure_share=window.failure_share(),
            dead_letters=dead_by_queue.get(queue, 0),
            per_minute=[series[m].finished() if m in series else 0 for m in slots],
            failures_per_minute=[series[m].failure_share() if m in series else None for m in slots],
        )
        row.health = health(row, firing)
        rows.append(row)
    return Figures(
        at=now,
        queues=rows,
        dead_letters=dead,
        leaders=providers.beat_leaders(),
        alerts=[
            {
                "id": a.pk,
                "slo": a.slo,
                "objective": a.objective,
                "status": a.status,
                "value": a.value,
                "threshold": a.threshold,
                "playbook": a.playbook,
            }
            for a in open_alerts
        ],
    )
