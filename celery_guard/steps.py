"""The guard pipeline of every guarded task: one step per feature, outermost first.

The observability step comes first, so every event of the steps inside it carries the run's
context (task id, queue, attempt, request id). The runs step comes next so it records the final
outcome of a bulk run's item as the failure step decides it (a retry leaves the item running,
a dead letter fails it). The failure step follows so the poison-message cap and the
dead-letter write see every outcome of the steps inside it, a ledger that cannot be reached
included.

The limits step is inside the failure step and outside the idempotency step: the failure step
dead-letters a delivery that starts past its deadline before it is admitted (a job paused
past its deadline never runs) and lets a deferral's ``Retry`` through without counting an
attempt; a deferred delivery never takes its idempotency key's lease. The admitted step comes
last (innermost): a delivery has ``started`` only once every gate before it (idempotency,
limits) let it through, just before its body runs.

The routing step only stamps the priority level at publish: it comes before the limits step,
whose task policy may override that level.
"""

from celery_guard.core.pipeline import Pipeline
from celery_guard.delivery.step import DeliveryStep
from celery_guard.failures.step import FailuresStep
from celery_guard.idempotency.step import IdempotencyStep
from celery_guard.limits.step import LimitsStep
from celery_guard.observability.step import AdmittedStep, ObservabilityStep
from celery_guard.routing.step import RoutingStep
from celery_guard.runs.step import RunsStep

GUARD = Pipeline(
    [
        ObservabilityStep(),
        RunsStep(),
        FailuresStep(),
        RoutingStep(),
        LimitsStep(),
        IdempotencyStep(),
        DeliveryStep(),
        AdmittedStep(),
    ]
)
