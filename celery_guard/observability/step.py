"""The observability steps: carry the request id into the header, and report every run.

:class:`ObservabilityStep` is the outermost step (the run's context, its outcome);
:class:`AdmittedStep` the innermost, so ``started`` means the delivery passed every gate
(idempotency, limits) and its body runs: a delivery deduplicated, busy or deferred ends in its
outcome event without having started.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Mapping
from typing import Any

from celery.exceptions import Retry

from celery_guard.core.pipeline import Delivery, Publish, Step
from celery_guard.observability import context, events

#: The guard header field of the request id and initiator.
REQUEST = "request"


def _queue(request: Any) -> str | None:
    info = request.delivery_info or {}
    queue = info.get("routing_key") or info.get("queue")
    return str(queue) if queue else None


def _eta(request: Any) -> float | None:
    eta = request.eta
    if not eta:
        return None
    try:
        return dt.datetime.fromisoformat(str(eta)).timestamp()
    except ValueError:
        return None


def lag(guard: Mapping[str, Any], request: Any, now: float) -> float | None:
    """Seconds between when the delivery could start (its publish, or its ETA) and ``now``."""
    sent = guard.get("sent_at")
    if not isinstance(sent, (int, float)) or isinstance(sent, bool):
        # A header written before ``sent_at`` existed: only a first attempt's is known.
        first = guard.get("first_enqueued_at")
        attempt = guard.get("attempt")
        if attempt != 1 or not isinstance(first, (int, float)):
            return None
        sent = first
    eta = _eta(request)
    ready = max(float(sent), eta) if eta is not None else float(sent)
    return max(0.0, now - ready)


class ObservabilityStep(Step):
    """Request id into the header at enqueue; the run context and its events in the worker.

    Listed first (outermost), so every event of the steps inside it carries the run's task
    id, queue, attempt and request id.
    """

    name = "observability"

    def prepare(self, publish: Publish) -> None:
        """Stamp the current origin (request id, initiator) as the ``request`` field."""
        if REQUEST in publish.inherited:
            return  # a retry or replay keeps its own origin
        origin = context.origin()
        publish.fields[REQUEST] = origin.header() if origin is not None else None

    def publish(
        self,
        task: Any,
        header: Mapping[str, Any],
        task_id: str,
        send: Callable[[], Any],
        delay: float = 0.0,
    ) -> Any:
        """Emit ``enqueued`` when the message went out (not for a deduplicated call)."""
        result = send()
        if events.listening() and getattr(result, "id", None) == task_id:
            identity = header.get("idempotency")
            key = (
                identity.get("key")
                if identity is not None and isinstance(identity, Mapping)
                else None
            )
            events.emit(
                "enqueued",
                task_id=task_id,
                task_name=task.name,
                queue=None,
                attempt=header.get("attempt"),
                tenant=header.get("tenant"),
                priority=header.get("priority"),
                idempotency_key_hash=events.key_hash(key),
            )
        return result

    def around(self, delivery: Delivery, call: Callable[[], Any]) -> Any:
        """Run the delivery in its context; ``succeeded`` unless a step emitted the outcome."""
        request = delivery.request
        if request.called_directly:
            return call()
        guard = delivery.guard
        attempt = guard.get("attempt")
        tenant = guard.get("tenant")
        run = context.Run(
            task_id=request.id,
            task_name=delivery.task.name,
            queue=_queue(request),
            attempt=attempt if isinstance(attempt, int) else (request.retries or 0) + 1,
            tenant=str(tenant) if tenant is not None else None,
            origin=context.origin_from_header(guard.get(REQUEST)),
        )
        with context.bind_run(run):
            try:
                result = call()
            except Retry as retried:
                if run.outcome is None:  # the body called self.retry() itself
                    events.emit(
                        "retry_scheduled", kind="requested", delay=_delay(retried), error_class=None
                    )
                raise
            if run.outcome is None:
                events.emit("succeeded")
            return result


class AdmittedStep(Step):
    """Innermost: ``started`` (with the lag) once every gate let the delivery through."""

    name = "admitted"

    def around(self, delivery: Delivery, call: Callable[[], Any]) -> Any:
        """Emit ``started`` in the run's context, then call the body."""
        request = delivery.request
        if not request.called_directly and events.listening() and context.current() is not None:
            events.emit("started", lag=lag(delivery.guard, request, time.time()))
        return call()


def _delay(retried: Retry) -> float | None:
    when = retried.when
    if isinstance(when, (int, float)):
        return float(when)
    if isinstance(when, dt.datetime):
        return max(0.0, when.timestamp() - time.time())
    return None
