"""The running-delivery marker of the poison-message cap."""

from __future__ import annotations

from django.db import models
from django.utils import timezone


class Delivery(models.Model):
    """A delivery of a guarded task that is running (or whose worker died while running it).

    Written before the task body runs and deleted when it ends, so a delivery that finds the
    row of its own task id and retry count is a redelivery after a lost worker process.
    """

    task_id = models.CharField(max_length=255, unique=True)
    task_name = models.CharField(max_length=255)
    retries = models.PositiveIntegerField(default=0)
    token = models.CharField(max_length=32)
    lost = models.PositiveIntegerField(default=0)
    timed_out = models.BooleanField(default=False)
    started_at = models.DateTimeField(default=timezone.now)
    hostname = models.CharField(max_length=255, blank=True)
    pid = models.PositiveIntegerField(null=True, blank=True)

    class Meta:
        verbose_name_plural = "deliveries"

    def __str__(self) -> str:
        return f"{self.task_name}[{self.task_id}] lost {self.lost}"
