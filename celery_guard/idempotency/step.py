"""The idempotency step: stamp the key at enqueue, publish it once, run its body once."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from celery_guard.core.pipeline import Delivery, Publish, Step
from celery_guard.idempotency import dedup, keys


class IdempotencyStep(Step):
    """Idempotency keys with dedup windows (see ``docs/idempotency.md``)."""

    name = "idempotency"
    options = (keys.IDEMPOTENCY_KEY, keys.DEDUP_WINDOW, keys.IDEMPOTENCY_CONFLICT)

    def prepare(self, publish: Publish) -> None:
        """Derive the call's key (``IdempotencyKeyError`` when it cannot be)."""
        identity = keys.identify(
            publish.task, publish.args, publish.kwargs, publish.per_call, publish.inherited
        )
        publish.fields[keys.HEADER_FIELD] = identity.header() if identity else None

    def publish(
        self,
        task: Any,
        header: Mapping[str, Any],
        task_id: str,
        send: Callable[[], Any],
        delay: float = 0.0,
    ) -> Any:
        """Publish unless the key is already held inside its window."""
        identity = keys.Identity.from_header(header)
        return dedup.publish_once(task, identity, task_id, send, delay)

    def around(self, delivery: Delivery, call: Callable[[], Any]) -> Any:
        """Run the body under the key's lease, or skip a key that already succeeded."""
        return dedup.run_guarded(
            delivery.task, delivery.args, delivery.kwargs, call, delivery.request, delivery.guard
        )
