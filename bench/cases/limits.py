"""Guarded with limits that never bind: ``concurrency`` and ``rate`` far above the load.

What a limit costs when it is not hit: one Lua admission (concurrency and rate in one round
trip) before the body and one release after it, plus the in-process policy read.
"""

from __future__ import annotations

from bench.benchapp import bodies
from bench.cases import Variant, register
from celery_guard import guarded_task
from celery_guard.conf import guard_settings

#: Issue 16's targets: a limit that never binds costs at most 5 % on 10 ms tasks and at most
#: 2 Redis round trips per task.
LIMITS_TARGETS = {
    "drain_sleep_rate": 0.95,
    "extra_commands_execute": 2,
}

TASKS = {
    kind: guarded_task(
        name=f"bench.limits.{kind}",
        priority="default",
        ignore_result=True,
        concurrency=10_000,
        rate="1000000/h",
    )(body)
    for kind, body in bodies.KINDS.items()
}

register(
    Variant(
        name="guarded-limits",
        title="routing + a limit that never binds",
        tasks=TASKS,
        queue=guard_settings.priority_queues["default"],
        targets=LIMITS_TARGETS,
        order=40,
        description=(
            "@guarded_task(priority='default', concurrency=10000, rate='1000000/h'): one Lua "
            "admission before the body and one release after it (Redis), policies read from "
            "memory."
        ),
    )
)
