"""The routing step: resolve the priority level of a publish and check that it has a queue."""

from __future__ import annotations

from celery_guard.core.pipeline import Publish, Step
from celery_guard.routing import router


class RoutingStep(Step):
    """Priority levels mapped to queues (the router reads the level from the header)."""

    name = "routing"
    options = (router.PRIORITY,)

    def prepare(self, publish: Publish) -> None:
        """Stamp the level; ``ValueError`` when it is not in ``CELERY_GUARD_PRIORITY_QUEUES``."""
        level = router.PRIORITY.resolve(publish.per_call, publish.task.guard_options)
        router.queue_for(level)
        publish.fields["priority"] = level
