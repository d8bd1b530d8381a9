"""The delivery step: the ``outbox`` option (durable ``delay_on_commit``)."""

from __future__ import annotations

from typing import Any

from celery_guard.core.options import GuardOption
from celery_guard.core.pipeline import Step


def _validate_outbox(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected True or False, got {type(value).__name__}")
    return value


OUTBOX = GuardOption(name="outbox", validate=_validate_outbox, setting="OUTBOX", per_call=False)


class DeliveryStep(Step):
    """Outbox rows for ``delay_on_commit`` and the schedule (see ``docs/delivery.md``).

    Both act in ``GuardedTask``'s on-commit and delayed publish paths rather than in a hook:
    they replace the broker publish, which the idempotency step wraps.
    """

    name = "delivery"
    options = (OUTBOX,)
