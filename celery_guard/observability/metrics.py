"""Prometheus metrics (the ``prometheus`` extra): counters and histograms fed by the events.

Labels are bounded: task name, queue, outcome, priority; never keys, arguments or messages.
Under a prefork worker every pool process writes its own files in prometheus-client's
multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, set for the worker *and* the web process on
the same machine); a pool process that exits (``--max-tasks-per-child``) keeps its counts in
its files, and its live gauges are removed (``mark_process_dead``). The broker and database
figures (queue depth, oldest age, dead letters, beat leader) are read at scrape time.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

from celery import current_app

from celery_guard.conf import guard_settings
from celery_guard.observability import broker, providers
from celery_guard.observability.events import Event

logger = logging.getLogger(__name__)

#: Environment variable of prometheus-client's multiprocess mode.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

#: Outcome events counted, and the outcome label they get.
OUTCOMES: Mapping[str, str] = {
    "succeeded": "succeeded",
    "retry_scheduled": "retried",
    "dead_lettered": "dead_lettered",
    "deduplicated": "deduplicated",
    "key_busy": "key_busy",
    "deferred": "deferred",
    "throttled": "throttled",
    "requeued": "requeued",
}

#: Lag and duration buckets (seconds).
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600)


def available() -> bool:
    """Whether prometheus-client is installed."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        return False
    return True


class _Metrics:
    """The metric objects, made on first use (after the worker forked its pool)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Histogram

        self.outcomes = Counter(
            "celery_guard_task_outcomes",
            "Deliveries of guarded tasks by outcome.",
            ["task", "queue", "outcome"],
        )
        self.enqueued = Counter(
            "celery_guard_enqueued", "Guarded tasks published.", ["task", "priority"]
        )
        self.lag = Histogram(
            "celery_guard_task_lag_seconds",
            "Seconds from publish (or ETA) to start.",
            ["task", "queue"],
            buckets=BUCKETS,
        )
        self.duration = Histogram(
            "celery_guard_task_duration_seconds",
            "Seconds a delivery ran, by outcome.",
            ["task", "queue", "outcome"],
            buckets=BUCKETS,
        )
        self.children: dict[tuple[Any, ...], Any] = {}

    def child(self, metric: Any, *labels: str) -> Any:
        # labels() takes a lock and builds a key per call; a cached child is one dict lookup.
        key = (id(metric), *labels)
        found = self.children.get(key)
        if found is None:
            found = self.children[key] = metric.labels(*labels)
        return found


_state: dict[str, _Metrics] = {}


def _metrics() -> _Metrics:
    found = _state.get("metrics")
    if found is None:
        found = _state["metrics"] = _Metrics()
    return found


def record(event: Event, fields: Mapping[str, Any]) -> None:
    """Subscriber: count outcomes, observe lag and duration."""
    name = event.name
    if name == "started":
        lag = fields.get("lag")
        if lag is not None:
            m = _metrics()
            m.child(m.lag, fields.get("task_name") or "", fields.get("queue") or "").observe(lag)
        return
    outcome = OUTCOMES.get(name)
    if outcome is not None:
        m = _metrics()
        task, queue = fields.get("task_name") or "", fields.get("queue") or ""
        m.child(m.outcomes, task, queue, outcome).inc()
        duration = fields.get("duration")
        if duration is not None and fields.get("where") != "enqueue":
            m.child(m.duration, task, queue, outcome).observe(duration)
    elif name == "enqueued":
        m = _metrics()
        m.child(m.enqueued, fields.get("task_name") or "", fields.get("priority") or "").inc()


def enabled() -> bool:
    """Whether events feed Prometheus (the setting, and prometheus-client installed)."""
    return guard_settings.metrics and available()


def mark_process_dead(pid: int | None = None) -> None:
    """Remove a dead pool process's live gauges (multiprocess mode only)."""
    if not os.environ.get(MULTIPROC_ENV) or not available():
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid if pid is not None else os.getpid())  # type: ignore[no-untyped-call]


def queues() -> list[str]:
    """The queues whose depth is reported: the priority queues and Celery's default queue."""
    names = list(guard_settings.priority_queues.values())
    default = current_app.conf.task_default_queue
    if default:
        names.append(str(default))
    return list(dict.fromkeys(names))


class StateCollector:
    """Scrape-time gauges: queue depth and oldest age, dead letters, beat leader."""

    def collect(self) -> Iterator[Any]:
        """Read the broker and the database once per scrape."""
        from prometheus_client.core import GaugeMetricFamily

        depth = GaugeMetricFamily(
            "celery_guard_queue_depth", "Messages waiting in the queue.", labels=["queue"]
        )
        age = GaugeMetricFamily(
            "celery_guard_queue_oldest_age_seconds",
            "Age of the oldest waiting message (Redis only).",
            labels=["queue"],
        )
        for state in broker.read(str(current_app.conf.broker_url), queues()):
            if state.depth is not None:
                depth.add_metric([state.queue], state.depth)
            if state.oldest_age is not None:
                age.add_metric([state.queue], state.oldest_age)
        dlq = GaugeMetricFamily(
            "celery_guard_dlq_depth", "Open dead letters.", labels=["task", "queue"]
        )
        for count in providers.dead_letters():
            dlq.add_metric([count.task_name, count.queue], count.count)
        leader = GaugeMetricFamily(
            "celery_guard_beat_leader",
            "1 while a beat holds the lease of the lock.",
            labels=["lock"],
        )
        for lease in providers.beat_leaders():
            leader.add_metric([lease.lock], 1 if lease.holder else 0)
        yield from (depth, age, dlq, leader)


class _ThisProcess:
    def collect(self) -> Iterator[Any]:
        from prometheus_client import REGISTRY

        yield from REGISTRY.collect()


def exposition() -> tuple[bytes, str]:
    """The text exposition of every metric, and its content type."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    path = os.environ.get(MULTIPROC_ENV)
    if path:
        from prometheus_client import multiprocess

        multiprocess.MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]
    else:
        registry.register(_ThisProcess())
    registry.register(StateCollector())
    return generate_latest(registry), CONTENT_TYPE_LATEST
