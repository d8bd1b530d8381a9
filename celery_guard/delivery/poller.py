"""The delivery poller: moves due scheduled messages and publishes missed outbox rows.

One poller per schedule is active at a time (a lease in Redis or in the database); the others
try for the lease once per poll, which is their whole idle cost. Runs in a thread of every
worker (``bootstep``) and in ``manage.py celery_guard relay``.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from datetime import timedelta
from typing import Any

from django.apps import apps
from django.db import close_old_connections
from django.db.models import Q
from django.utils import timezone

from celery_guard.conf import guard_settings
from celery_guard.core import pipeline
from celery_guard.delivery import schedule, services
from celery_guard.delivery.models import DeliveryLease

logger = logging.getLogger(__name__)

#: Name of the database lease (the database schedule and outbox rows).
DB_LEASE = "delivery"
#: Longest pause between polls while the broker or the database is failing.
MAX_BACKOFF = 5.0


def outbox_used(app: Any) -> bool:
    """Whether outbox rows may be written: the setting, a task with ``outbox=True``, or the
    guarded beat (django-celery-beat installed), which writes every fire as an outbox row."""
    if guard_settings.outbox or apps.is_installed("django_celery_beat"):
        return True
    return any(
        pipeline.is_guarded(task) and task.guard_options.get("outbox")
        for task in list(app.tasks.values())
    )


def take_db_lease(holder: str, lease: float) -> bool:
    """Take or renew the database lease for ``holder``; return whether it holds it."""
    now = timezone.now()
    fields = {"holder": holder, "renewed_at": now, "expires_at": now + timedelta(seconds=lease)}
    mine = Q(holder=holder) | Q(expires_at__lt=now)
    if DeliveryLease.objects.filter(mine, name=DB_LEASE).update(**fields):
        return True
    _, created = DeliveryLease.objects.get_or_create(name=DB_LEASE, defaults=fields)
    return created


def release_db_lease(holder: str) -> None:
    """Give the database lease up if ``holder`` has it."""
    DeliveryLease.objects.filter(name=DB_LEASE, holder=holder).update(expires_at=timezone.now())


def alive(app: Any) -> str | None:
    """The holder of an unexpired poller lease (a live poller), or ``None``."""
    if schedule.backend_name(app) == "redis":
        holder = schedule.RedisSchedule(app).holder()
        if holder:
            return holder
    lease = DeliveryLease.objects.filter(name=DB_LEASE, expires_at__gt=timezone.now()).first()
    return lease.holder if lease is not None else None


class Poller:
    """Polls the schedule and the outbox of one Celery app."""

    def __init__(self, app: Any, *, outbox: bool | None = None) -> None:
        self.app = app
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.backend = schedule.backend_name(app)
        self.redis = schedule.RedisSchedule(app) if self.backend == "redis" else None
        self.outbox = outbox_used(app) if outbox is None else outbox
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False

    def tick(self) -> int:
        """One poll: lease, due messages, missed outbox rows; return messages published (-1
        when another poller holds the lease)."""
        batch = guard_settings.delivery_batch
        lease = guard_settings.delivery_lease
        moved = 0
        if self.redis is not None:
            moved = self.redis.move_due(self.holder, batch)
            if moved < 0:
                return -1
            if not self.outbox:
                return moved
        elif self.backend is None and not self.outbox:
            return 0
        if not take_db_lease(self.holder, lease):
            return -1
        _, rows = services.claim_due(batch, lease)
        return moved + services.publish_claimed(self.app, rows)

    def run(self) -> None:
        """Poll until :meth:`stop`, backing off while the broker or the database fails."""
        interval = guard_settings.delivery_poll_interval
        delay = interval
        while not self._stop.is_set():
            try:
                published = self.tick()
            except Exception as exc:
                if not self._failing:
                    logger.warning("celery_guard: delivery poll failed (%s); backing off", exc)
                self._failing = True
                delay = min(max(delay, interval) * 2, MAX_BACKOFF)
                close_old_connections()
            else:
                if self._failing:
                    logger.warning("celery_guard: delivery poller recovered")
                self._failing = False
                # A full batch means more is due: poll again at once.
                delay = 0 if published >= guard_settings.delivery_batch else interval
            self._stop.wait(delay)
        self.release()

    def release(self) -> None:
        """Give the leases up, so another poller takes over at once."""
        try:
            if self.redis is not None:
                self.redis.release(self.holder)
            if self.outbox or self.redis is None:
                release_db_lease(self.holder)
        except Exception:
            logger.debug("celery_guard: could not release the delivery lease", exc_info=True)
        close_old_connections()

    def start(self) -> None:
        """Run in a daemon thread."""
        self._thread = threading.Thread(target=self.run, name="celery_guard-delivery", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5) -> None:
        """Stop the loop and wait for the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
