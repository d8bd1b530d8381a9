"""Tasks of the bulk-run benchmark (bench/runs.py): one 10 ms body, plain and guarded.

``guarded_redis`` is the same guarded task whose idempotency ledger is the Redis one (the
bench's ledger selector, ``bench.cases.idempotency``), on the worker and at its publish in
``publishing_with(redis_ledger)``: a run of it shows what the run costs apart from the
database ledger's writes of its items' keys.
"""

from __future__ import annotations

from celery import shared_task

from bench import naming
from bench.benchapp import bodies
from bench.cases import idempotency
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
guarded_redis = guarded_task(
    name="bench.runs.guarded_redis", priority="default", ignore_result=True
)(sleep_and_count)
idempotency.use_ledger(guarded_redis.name, idempotency.redis_ledger)
