"""Baseline: plain Celery ``@shared_task`` tasks, routed to a queue of their own."""

from __future__ import annotations

from celery import shared_task

from bench import naming
from bench.benchapp import bodies
from bench.cases import Variant, register

QUEUE = f"{naming.prefix()}-plain"

# The same options a guarded task has, set explicitly so the baseline does not depend on
# global settings staying identical (they are: bench/settings.py).
#: The options of every plain task of the bench.
PLAIN_OPTIONS = {
    "acks_late": True,
    "reject_on_worker_lost": True,
    "serializer": "json",
    "ignore_result": True,
}
TASKS = {
    kind: shared_task(name=f"bench.plain.{kind}", queue=QUEUE, **PLAIN_OPTIONS)(body)
    for kind, body in bodies.KINDS.items()
}

register(
    Variant(
        name="plain",
        title="plain Celery",
        tasks=TASKS,
        queue=QUEUE,
        baseline=True,
        description="@shared_task with acks_late and reject_on_worker_lost, routed by queue=.",
    )
)
