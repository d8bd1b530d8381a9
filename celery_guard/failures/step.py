"""The failure pipeline's step: outermost, so it sees every outcome of the steps inside it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery_guard.core.pipeline import Delivery, Step
from celery_guard.failures import handler, retry


class FailuresStep(Step):
    """Classify, retry with backoff, cap lost deliveries and dead-letter (worker side)."""

    name = "failures"
    options = retry.OPTIONS

    def around(self, delivery: Delivery, call: Callable[[], Any]) -> Any:
        """Run one delivery through the failure handler; direct and eager calls pass through."""
        request = delivery.request
        if request.called_directly or request.is_eager or request.id is None:
            return call()
        return handler.run(delivery.task, call, request, delivery.guard)
