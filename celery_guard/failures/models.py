"""The delivery marker of the poison-message cap."""

from __future__ import annotations

from django.db import models
from django.utils import timezone


class Delivery(models.Model):
    """The lost deliveries of a guarded task's message (the poison-message cap).

    Written by the worker's main process when a delivery loses its worker or hits the hard
    time limit, and by a redelivery while it runs (``celery_guard.failures.deliveries``);
    deleted when a delivery ends.
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
