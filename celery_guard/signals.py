"""Django signals that celery_guard sends (connect receivers to them like any Django signal)."""

from __future__ import annotations

from django.dispatch import Signal

#: Sent after a :class:`~celery_guard.models.DeadLetter` row is written, with keyword
#: arguments ``dead_letter``, ``task_name``, ``task_id``, ``idempotency_key`` (or None) and
#: ``reason``. Receiver errors are logged, never raised into the worker: the row is written.
dead_lettered = Signal()

#: A guarded beat became the leader of its lock name, with keyword arguments ``lock_name``,
#: ``holder`` (``host:pid:uuid``) and ``token`` (the fencing token of the new term).
lease_acquired = Signal()

#: A guarded beat stopped being the leader (it was taken over, could not renew in time, or
#: released the lease on shutdown), with keyword arguments ``lock_name``, ``holder``,
#: ``token`` (of the term that ended) and ``reason`` (text).
lease_lost = Signal()
