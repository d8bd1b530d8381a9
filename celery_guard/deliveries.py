"""Running-delivery markers: detect redeliveries after a lost worker (the poison-message cap).

Celery requeues the message of a task whose worker process died (``reject_on_worker_lost``)
with no limit (celery#9082) and brokers keep no count. Each delivery of a guarded task
writes a marker row before its body runs and deletes it when it ends; a delivery that finds
the marker of its own task id and retry count left behind is a redelivery after the previous
one lost its worker (or, marked by the main process, hit the hard time limit).
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass

from django.db import IntegrityError, transaction
from django.utils import timezone

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


def begin(task_id: str, task_name: str, retries: int, hostname: str) -> Started:
    """Write this delivery's marker, counting the previous delivery if it never ended."""
    from celery_guard.models import Delivery

    token = uuid.uuid4().hex
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
                    # The previous delivery of this very message began and never ended.
                    if row.timed_out:
                        timed_out = True
                    else:
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
    from celery_guard.models import Delivery

    Delivery.objects.filter(task_id=task_id, token=token, timed_out=False).delete()


def mark_timed_out(task_id: str) -> None:
    """Note that the running delivery of ``task_id`` was killed by the hard time limit."""
    from celery_guard.models import Delivery

    updated = Delivery.objects.filter(task_id=task_id).update(timed_out=True)
    if not updated:
        logger.warning("celery_guard: no running delivery of %s to mark as timed out", task_id)
