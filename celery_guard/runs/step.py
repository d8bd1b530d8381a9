"""The bulk-runs step: record the outcome of each item of a run on the worker."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from celery_guard.core import headers
from celery_guard.core.pipeline import Delivery, Step
from celery_guard.runs import outcomes


class RunsStep(Step):
    """Items of bulk runs: running, then one final outcome each (see ``docs/runs.md``).

    Outermost, so it sees the final outcome of the failure step inside it: a retry leaves the
    item running, a dead letter makes it failed.
    """

    name = "runs"

    def around(self, delivery: Delivery, call: Callable[[], Any]) -> Any:
        """Run an item's delivery through ``outcomes.run_item``; other tasks pass through."""
        request = delivery.request
        if request.called_directly or request.is_eager:
            return call()
        guard = delivery.guard
        entry = guard.get(headers.RUN)
        # A dead-letter replay of an item runs the task, outside the run it came from.
        if entry is None or not isinstance(entry, Mapping) or "item" not in entry:
            return call()
        if "replay_of" in guard:
            return call()
        try:
            run_id, item_id = int(entry["run"]), int(entry["item"])
        except (KeyError, TypeError, ValueError):
            return call()
        return outcomes.run_item(delivery.task, run_id, item_id, call)
