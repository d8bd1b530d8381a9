"""Tasks of the bulk-run benchmark (bench/runs.py): one 10 ms body, plain and guarded."""

from __future__ import annotations

from celery import shared_task

from bench import naming
from bench.benchapp import bodies
from bench.cases.baseline import PLAIN_OPTIONS
from celery_guard import guarded_task

#: The queue of the plain side (the guarded side goes to the guard's ``default`` queue).
PLAIN_QUEUE = f"{naming.prefix()}-runs-plain"


def sleep_and_count(counter: str, ident: int) -> None:
    """Wait 10 ms (a task calling a fast service), then count itself into ``counter``."""
    bodies.sleep(ident)
    bodies.count(counter)


plain = shared_task(name="bench.runs.plain", queue=PLAIN_QUEUE, **PLAIN_OPTIONS)(sleep_and_count)
guarded = guarded_task(name="bench.runs.guarded", priority="default", ignore_result=True)(
    sleep_and_count
)
