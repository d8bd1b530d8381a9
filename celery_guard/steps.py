"""The guard pipeline of every guarded task: one step per feature, outermost first.

The observability step comes first, so every event of the steps inside it carries the run's
context (task id, queue, attempt, request id). The failure step comes next so the
poison-message cap and the dead-letter write see every outcome of the steps inside it, a
ledger that cannot be reached included.
"""

from celery_guard.core.pipeline import Pipeline
from celery_guard.failures.step import FailuresStep
from celery_guard.idempotency.step import IdempotencyStep
from celery_guard.observability.step import ObservabilityStep
from celery_guard.routing.step import RoutingStep

GUARD = Pipeline([ObservabilityStep(), FailuresStep(), IdempotencyStep(), RoutingStep()])
