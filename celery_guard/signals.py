"""celery_guard's own Django signals."""

from __future__ import annotations

from django.dispatch import Signal

#: Sent after a :class:`~celery_guard.models.DeadLetter` row is written, with keyword
#: arguments ``dead_letter``, ``task_name``, ``task_id``, ``idempotency_key`` (or None) and
#: ``reason``. Receiver errors are logged, never raised into the worker: the row is written.
dead_lettered = Signal()
