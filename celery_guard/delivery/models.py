"""Outbox rows (also the database schedule) and the poller's lease."""

from __future__ import annotations

from django.db import models


class OutboxState(models.TextChoices):
    """Where one outbox row is in its life."""

    PENDING = "pending", "pending"
    DISPATCHED = "dispatched", "dispatched"


class OutboxMessage(models.Model):
    """One message to publish: written in the caller's transaction, published when due.

    A row carries everything the publish needs (task, arguments, Celery options, message
    headers with the guard header, per-call guard options with the idempotency identity), so
    any process that has the task registered can publish it. ``due_at`` is the commit time
    for an outbox row and the due time for a message held in the database schedule.
    A poller claims due rows by writing ``claim`` and ``claimed_until`` in one conditional
    update; a claim whose poller died expires and the row is claimed again.
    """

    State = OutboxState

    task_name = models.CharField(max_length=200)
    task_id = models.CharField(max_length=255, db_index=True)
    args = models.JSONField(default=list)
    kwargs = models.JSONField(default=dict)
    options = models.JSONField(default=dict, help_text="Celery publish options")
    headers = models.JSONField(default=dict, help_text="message headers, guard header included")
    guard = models.JSONField(default=dict, help_text="per-call guard options")
    idempotency_key = models.CharField(max_length=255, blank=True)
    queue = models.CharField(max_length=200, blank=True)
    prepared = models.BooleanField(
        default=False, help_text="headers are final (a scheduled republish): sent as they are"
    )
    attempt = models.PositiveIntegerField(default=0, help_text="retries of the task so far")
    state = models.CharField(max_length=16, choices=OutboxState.choices, default="pending")
    created_at = models.DateTimeField()
    due_at = models.DateTimeField()
    claim = models.CharField(max_length=64, blank=True)
    claimed_until = models.DateTimeField(null=True, blank=True)
    publish_attempts = models.PositiveIntegerField(default=0)
    last_error = models.TextField(blank=True)
    dispatched_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name = "outbox message"
        verbose_name_plural = "outbox messages"
        indexes = [
            models.Index(fields=["state", "due_at"], name="celery_guard_outbox_due"),
            models.Index(fields=["state", "dispatched_at"], name="celery_guard_outbox_done"),
        ]
        ordering = ["due_at"]

    def __str__(self) -> str:
        return f"{self.task_name}[{self.task_id}] {self.state}"


class DeliveryLease(models.Model):
    """The lease of the active poller of one schedule, and its last heartbeat (the doctor's)."""

    name = models.CharField(max_length=200, unique=True)
    holder = models.CharField(max_length=255, blank=True)
    renewed_at = models.DateTimeField()
    expires_at = models.DateTimeField()

    class Meta:
        verbose_name = "delivery poller lease"
        verbose_name_plural = "delivery poller leases"

    def __str__(self) -> str:
        return f"{self.name} held by {self.holder or '(nobody)'}"
