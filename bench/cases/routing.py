"""Guarded, routing only: ``@guarded_task(priority="default")``, routed by the guard router."""

from __future__ import annotations

from bench.benchapp import bodies
from bench.cases import Variant, register
from celery_guard import guarded_task
from celery_guard.conf import guard_settings

#: Issue 12's targets for routing only: ratios guarded/plain and extra Redis commands per task.
ROUTING_TARGETS = {
    "enqueue_rate": 0.95,
    "drain_noop_rate": 0.90,
    "drain_sleep_rate": 0.97,
    "extra_commands_enqueue": 2,
    "extra_commands_execute": 1,
    "extra_db_commits_execute": 0,
}

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
        targets=ROUTING_TARGETS,
        order=10,
        description=(
            "@guarded_task(priority='default'): payload check, guard header, priority router; "
            "in the worker, the failure pipeline (no database or Redis access on a first "
            "delivery that succeeds)."
        ),
    )
)
