"""Bulk runs: one operation over many items, one row per item, counters on the run."""

from __future__ import annotations

import uuid

from django.db import models
from django.utils import timezone


class RunStatus(models.TextChoices):
    """Where a bulk run stands."""

    QUEUED = "queued", "queued"
    RUNNING = "running", "running"
    SUCCEEDED = "succeeded", "succeeded"
    COMPLETED_WITH_ERRORS = "completed_with_errors", "completed with errors"
    CANCELLED = "cancelled", "cancelled"


#: Statuses of a run whose every item is final.
FINISHED_RUN_STATUSES = (
    RunStatus.SUCCEEDED,
    RunStatus.COMPLETED_WITH_ERRORS,
    RunStatus.CANCELLED,
)


class ItemStatus(models.TextChoices):
    """Where one item of a bulk run stands."""

    PENDING = "pending", "pending"
    RUNNING = "running", "running"
    SUCCEEDED = "succeeded", "succeeded"
    FAILED = "failed", "failed"
    SKIPPED = "skipped", "skipped (deduplicated)"
    CANCELLED = "cancelled", "cancelled"


#: Statuses an item leaves exactly once (each counted once on its run).
OPEN_ITEM_STATUSES = (ItemStatus.PENDING, ItemStatus.RUNNING)
FINAL_ITEM_STATUSES = (
    ItemStatus.SUCCEEDED,
    ItemStatus.FAILED,
    ItemStatus.SKIPPED,
    ItemStatus.CANCELLED,
)
#: The run's counter column of each final item status.
COUNTERS = {
    ItemStatus.SUCCEEDED: "succeeded",
    ItemStatus.FAILED: "failed",
    ItemStatus.SKIPPED: "skipped",
    ItemStatus.CANCELLED: "cancelled",
}


class BulkRun(models.Model):
    """One operation over many items: a guarded task called once per item.

    The counters are kept by the ``runs`` services in the transaction that moves an item to
    a final status, so they are exact at every commit (``pending`` is what is left).
    """

    Status = RunStatus

    uuid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    name = models.CharField(max_length=255, blank=True)
    task_name = models.CharField(max_length=255)
    status = models.CharField(max_length=32, choices=RunStatus.choices, default=RunStatus.QUEUED)
    #: Who started it: ``str(user)`` or the string given.
    initiator = models.CharField(max_length=255, blank=True)
    #: The run whose failed items this run retries.
    parent = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="retries"
    )
    total = models.PositiveIntegerField(default=0)
    succeeded = models.PositiveIntegerField(default=0)
    failed = models.PositiveIntegerField(default=0)
    skipped = models.PositiveIntegerField(default=0)
    cancelled = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(default=timezone.now)
    #: When the first item started on a worker.
    started_at = models.DateTimeField(null=True, blank=True)
    #: When the last item became final (the run's status is final from then on).
    finished_at = models.DateTimeField(null=True, blank=True)
    cancelled_by = models.CharField(max_length=255, blank=True)
    #: Every item published (by ``start_run``, or by the sweep after a crash).
    published = models.BooleanField(default=False)
    #: Last sign of life of the process publishing the items; the sweep takes over after it.
    publish_heartbeat = models.DateTimeField(default=timezone.now)
    #: The completion signature (``Signature`` as a dict), published once at the end.
    on_complete = models.JSONField(null=True, blank=True)
    #: Last attempt to publish the completion (claimed by a conditional update).
    completion_claimed_at = models.DateTimeField(null=True, blank=True)
    completion_published_at = models.DateTimeField(null=True, blank=True)
    completion_task_id = models.CharField(max_length=255, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [
            models.Index(fields=["status", "-created_at"], name="cg_run_status"),
            models.Index(fields=["finished_at"], name="cg_run_finished_at"),
        ]
        permissions = [
            ("retry_bulkrun", "Can retry the failed items of bulk runs"),
            ("cancel_bulkrun", "Can cancel bulk runs"),
        ]

    def __str__(self) -> str:
        return f"run #{self.pk} {self.name or self.task_name}"

    @property
    def done(self) -> int:
        """Items in a final status."""
        return self.succeeded + self.failed + self.skipped + self.cancelled

    @property
    def pending(self) -> int:
        """Items not final yet (pending or running)."""
        return self.total - self.done

    @property
    def is_finished(self) -> bool:
        """Whether every item is final."""
        return self.finished_at is not None

    def summary(self) -> dict[str, object]:
        """The run's outcome as plain JSON (what the completion task receives)."""
        return {
            "run": self.pk,
            "name": self.name,
            "task": self.task_name,
            "status": self.status,
            "total": self.total,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "skipped": self.skipped,
            "cancelled": self.cancelled,
            "started_at": self.started_at.isoformat() if self.started_at else None,
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
        }


class BulkRunItem(models.Model):
    """One item of a run: its arguments, task id, key, status, attempts and error."""

    Status = ItemStatus

    #: No index of its own: the unique ``(run, seq)`` serves every look-up by run (each index
    #: is one more entry to write at every change of an item's status).
    run = models.ForeignKey(BulkRun, on_delete=models.CASCADE, related_name="items", db_index=False)
    #: Position of the item in the ``items`` given to ``start_run`` (0-based).
    seq = models.PositiveIntegerField()
    kwargs = models.JSONField(default=dict)
    task_id = models.CharField(max_length=255)
    #: The idempotency key the item runs under.
    key = models.CharField(max_length=255, blank=True)
    status = models.CharField(max_length=16, choices=ItemStatus.choices, default=ItemStatus.PENDING)
    published = models.BooleanField(default=False)
    #: Deliveries that started the item (retries and redeliveries included).
    attempts = models.PositiveIntegerField(default=0)
    error_class = models.CharField(max_length=255, blank=True)
    error_message = models.TextField(blank=True)
    dead_letter = models.ForeignKey(
        "celery_guard.DeadLetter",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        db_constraint=False,
        db_index=False,  # a partial index (below): only failed items have a dead letter
    )
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["run", "seq"]
        constraints = [
            models.UniqueConstraint(fields=["run", "seq"], name="cg_run_item_seq"),
        ]
        indexes = [
            # The card's error table and "retry failed": items of a run by status.
            models.Index(fields=["run", "status", "seq"], name="cg_run_item_status"),
            models.Index(fields=["run", "error_class", "seq"], name="cg_run_item_error"),
            models.Index(fields=["task_id"], name="cg_run_item_task_id"),
            # A dead letter's items (its deletion sets their link to NULL).
            models.Index(
                fields=["dead_letter"],
                name="cg_run_item_dead_letter",
                condition=models.Q(dead_letter__isnull=False),
            ),
        ]

    def __str__(self) -> str:
        return f"item {self.seq} of run #{self.run_id}"
