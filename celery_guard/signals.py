"""Django signals that celery_guard sends, for the package's own features and for projects."""

from __future__ import annotations

from django.dispatch import Signal

#: Sent when a run of a guarded task ends in the dead-letter queue, with keyword arguments
#: ``task_name``, ``task_id``, ``idempotency_key`` (``None`` when the task has none) and
#: ``reason``.
dead_lettered = Signal()
