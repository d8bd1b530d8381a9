"""Observability's overhead: the routing variant's tasks without the observability step.

``guarded-routing`` runs the whole pipeline, events included (log records at WARNING, so
``started``/``succeeded`` are not written; Prometheus counters and histograms when
prometheus-client is installed; rollups buffered and written every 10 s). This variant is the
same pipeline minus :class:`~celery_guard.observability.step.ObservabilityStep`, so nothing is
emitted on the success path: the ratio of the two is the events' cost (issue 18: >= 0.95 on
10 ms tasks, ``drain_sleep_rate``).
"""

from __future__ import annotations

from bench.benchapp import bodies
from bench.cases import ISSUE_TARGETS, Variant, register
from celery_guard import guarded_task
from celery_guard.conf import guard_settings
from celery_guard.core.pipeline import Pipeline
from celery_guard.steps import GUARD
from celery_guard.task import GuardedTask

#: The guard pipeline without its observability steps.
SILENT = Pipeline(step for step in GUARD.steps if step.name not in ("observability", "admitted"))


class SilentTask(GuardedTask):
    """A guarded task that emits no events on the success path."""

    guard_pipeline = SILENT


TASKS = {
    kind: guarded_task(
        name=f"bench.silent.{kind}", priority="default", ignore_result=True, base=SilentTask
    )(body)
    for kind, body in bodies.KINDS.items()
}

register(
    Variant(
        name="guarded-routing-noevents",
        title="guarded: routing only, no events",
        tasks=TASKS,
        queue=guard_settings.priority_queues["default"],
        targets=ISSUE_TARGETS,
        needs_database=True,
        order=11,
        description=(
            "guarded-routing without the observability step: compare the two for the cost of "
            "the events (logs at WARNING, Prometheus metrics, rollups)."
        ),
    )
)
