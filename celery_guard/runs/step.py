"""The bulk-runs step: record the outcome of each item of a run on the worker."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from celery_guard.core import headers
from celery_guard.core.pipeline import CallNext, Step
from celery_guard.runs import outcomes


class RunsStep(Step):
    """Items of bulk runs: running, then one final outcome each (see ``docs/runs.md``).

    Outermost, so it sees the final outcome of the failure step inside it: a retry leaves the
    item running, a dead letter makes it failed.
    """

    name = "runs"

    def run(self, task: Any, args: tuple[Any, ...], kwargs: dict[str, Any], call: CallNext) -> Any:
        """Run an item's delivery through ``outcomes.run_item``; other tasks pass through."""
        request = task.request
        if request.called_directly or request.is_eager:
            return call(*args, **kwargs)
        guard = headers.read(request.headers)
        entry = guard.get(headers.RUN)
        # A dead-letter replay of an item runs the task, outside the run it came from.
        if not isinstance(entry, Mapping) or "item" not in entry or "replay_of" in guard:
            return call(*args, **kwargs)
        try:
            run_id, item_id = int(entry["run"]), int(entry["item"])
        except (KeyError, TypeError, ValueError):
            return call(*args, **kwargs)
        return outcomes.run_item(task, run_id, item_id, args, kwargs, call)
