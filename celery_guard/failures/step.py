"""The failure pipeline's step: outermost, so it sees every outcome of the steps inside it."""

from __future__ import annotations

from typing import Any

from celery_guard.core.pipeline import CallNext, Step
from celery_guard.failures import handler, retry


class FailuresStep(Step):
    """Classify, retry with backoff, cap lost deliveries and dead-letter (worker side)."""

    name = "failures"
    options = retry.OPTIONS

    def run(self, task: Any, args: tuple[Any, ...], kwargs: dict[str, Any], call: CallNext) -> Any:
        """Run one delivery through the failure handler; direct and eager calls pass through."""
        request = task.request
        if request.called_directly or request.is_eager or request.id is None:
            return call(*args, **kwargs)
        return handler.run(task, call, args, kwargs)
