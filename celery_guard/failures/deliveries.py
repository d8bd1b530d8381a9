"""Delivery markers: count the deliveries of a message that lost their worker (poison cap).

Celery requeues the message of a task whose worker process died (``reject_on_worker_lost``)
with no limit (celery#9082) and brokers keep no count, so the guard keeps one per task id and
retry count, written only where a delivery was lost, never on the hot path:

- the worker's main process records a lost delivery (the pool reports ``WorkerLostError``) and
  a hard time limit kill (:mod:`celery_guard.failures.requests`) before it requeues the message;
- a redelivered message (``delivery_info["redelivered"]``, set by RabbitMQ and by kombu's Redis
  transport on every restore) reads the count and marks itself running until it ends, so a
  redelivery whose whole worker died (no main process left to record it) counts too;
- a first delivery writes nothing. On a broker that does not flag redeliveries every delivery
  marks itself running, as before.

A message that was only restored, never started (a warm shutdown restoring prefetched
messages, a visibility timeout), finds no count and its marker is deleted when it ends.
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass

from django.db import IntegrityError, connections, router, transaction
from django.utils import timezone

from celery_guard.core import inserts

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Started:
    """A delivery that has begun.

    Attributes:
        token: Identifies this delivery's marker, to delete only our own.
        lost: Deliveries of this message that lost their worker so far.
        timed_out: The previous delivery was killed by the hard time limit.
    """

    token: str
    lost: int
    timed_out: bool


def _insert_new(task_id: str, task_name: str, retries: int, token: str, hostname: str) -> bool:
    """Insert a fresh marker unless one exists, in one statement; return whether it did.

    ``INSERT ... ON CONFLICT (task_id) DO NOTHING RETURNING``: one round trip and one commit
    (PostgreSQL, SQLite >= 3.35), where the locked read-then-insert of :func:`begin`'s slow
    path takes four statements. A marker that exists is left untouched for the slow path.
    """
    from celery_guard.failures.models import Delivery

    fields = (
        "task_id",
        "task_name",
        "retries",
        "token",
        "lost",
        "timed_out",
        "started_at",
        "hostname",
        "pid",
    )
    values = (task_id, task_name, retries, token, 0, False, timezone.now(), hostname, os.getpid())
    alias = router.db_for_write(Delivery)
    return bool(
        inserts.insert_new(Delivery, alias, fields, [values], unique="task_id", returning="id")
    )


def begin(task_id: str, task_name: str, retries: int, hostname: str) -> Started:
    """Mark this delivery running, counting the previous delivery if it never ended.

    No marker of this task id is a single insert; a marker left behind (the count of a main
    process, a redelivery whose worker died whole, a retry racing the deletion of its
    predecessor's marker) is read under a row lock and counted.
    """
    from celery_guard.failures.models import Delivery

    token = uuid.uuid4().hex
    if _insert_new(task_id, task_name, retries, token, hostname):
        return Started(token, 0, False)
    for _ in range(3):
        try:
            with transaction.atomic():
                row = Delivery.objects.select_for_update().filter(task_id=task_id).first()
                if row is None:
                    Delivery.objects.create(
                        task_id=task_id,
                        task_name=task_name,
                        retries=retries,
                        token=token,
                        hostname=hostname,
                        pid=os.getpid(),
                    )
                    return Started(token, 0, False)
                timed_out = False
                if row.retries == retries:
                    if row.timed_out:
                        timed_out = True
                    elif row.token:
                        # The previous delivery of this very message began and never ended,
                        # and no main process recorded the loss (it died with it).
                        row.lost += 1
                else:
                    # A marker of an earlier message (a retry raced its deletion).
                    row.lost = 0
                row.retries = retries
                row.timed_out = False
                row.token = token
                row.started_at = timezone.now()
                row.hostname = hostname
                row.pid = os.getpid()
                row.save()
                return Started(token, row.lost, timed_out)
        except IntegrityError:
            continue  # another delivery of the same id created it first: read it again
    raise RuntimeError(f"could not write the delivery marker of task {task_id}")


def end(task_id: str, token: str) -> None:
    """Delete this delivery's marker.

    A later delivery's marker is left alone, and so is one the main process marked as timed
    out: the pool stops a child at its hard limit with SIGTERM, which still runs ``finally``.
    """
    from celery_guard.failures.models import Delivery

    # One DELETE statement: ``QuerySet.delete()`` wraps even a fast delete in a transaction
    # (BEGIN, DELETE, COMMIT), three round trips on every run of every guarded task.
    alias = router.db_for_write(Delivery)
    connection = connections[alias]
    quote = connection.ops.quote_name
    sql = (
        f"DELETE FROM {quote(Delivery._meta.db_table)} "
        f"WHERE {quote('task_id')} = %s AND {quote('token')} = %s AND {quote('timed_out')} = %s"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, (task_id, token, False))


def _record(
    task_id: str,
    task_name: str,
    retries: int,
    hostname: str,
    *,
    timed_out: bool,
) -> None:
    from celery_guard.failures.models import Delivery

    for _ in range(3):
        try:
            with transaction.atomic(using=router.db_for_write(Delivery)):
                row = Delivery.objects.select_for_update().filter(task_id=task_id).first()
                if row is None:
                    row = Delivery(task_id=task_id, task_name=task_name, retries=retries)
                elif row.retries != retries:
                    # The marker of an earlier message of this id (a retry): start afresh.
                    row.retries, row.lost, row.timed_out = retries, 0, False
                if timed_out:
                    row.timed_out = True
                elif not row.timed_out:
                    # (A delivery killed at its hard time limit is an attempt, not a loss.)
                    row.lost += 1
                # No delivery of this message runs now: its redelivery must not count it again.
                row.token = ""
                row.started_at = timezone.now()
                row.hostname = hostname
                row.pid = None
                row.save()
                return
        except IntegrityError:
            continue  # a delivery of the same id created it first: read it again
    raise RuntimeError(f"could not write the delivery marker of task {task_id}")


def record_lost(task_id: str, task_name: str, retries: int, hostname: str) -> None:
    """Count a delivery of ``task_id`` whose worker process was lost (worker main process)."""
    _record(task_id, task_name, retries, hostname, timed_out=False)


def mark_timed_out(
    task_id: str, task_name: str = "", retries: int | None = None, hostname: str = ""
) -> None:
    """Note that the delivery of ``task_id`` was killed by the hard time limit.

    With ``retries`` (the worker's main process knows it), the marker is written even where
    the delivery wrote none; without, only a running delivery's marker is marked.
    """
    from celery_guard.failures.models import Delivery

    if retries is not None:
        _record(task_id, task_name, retries, hostname, timed_out=True)
        return
    updated = Delivery.objects.filter(task_id=task_id).update(timed_out=True)
    if not updated:
        logger.warning("celery_guard: no running delivery of %s to mark as timed out", task_id)
