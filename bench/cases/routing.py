"""Guarded, routing only: ``@guarded_task(priority="default")``, routed by the guard router."""

from __future__ import annotations

from bench.benchapp import bodies
from bench.cases import ISSUE_TARGETS, Variant, register
from celery_guard import guarded_task
from celery_guard.conf import guard_settings

TASKS = {
    kind: guarded_task(name=f"bench.routing.{kind}", priority="default", ignore_result=True)(body)
    for kind, body in bodies.KINDS.items()
}

register(
    Variant(
        name="guarded-routing",
        title="guarded: routing only",
        tasks=TASKS,
        queue=guard_settings.priority_queues["default"],
        targets=ISSUE_TARGETS,
        description=(
            "@guarded_task(priority='default'): payload check, guard header, priority router."
        ),
    )
)
