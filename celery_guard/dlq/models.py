"""Dead letters (final failures) and the record of their replays."""

from __future__ import annotations

from django.db import models
from django.utils import timezone


class Reason(models.TextChoices):
    """Why a task ended as a dead letter."""

    PERMANENT = "permanent", "permanent error"
    EXHAUSTED = "exhausted", "attempts exhausted"
    DEADLINE = "deadline", "deadline passed"
    WORKER_LOST = "worker_lost", "worker lost too often"
    TIMEOUT = "timeout", "hard time limit"
    REJECTED = "rejected", "rejected by the task"
    FAILED = "failed", "unguarded task failed"
    INVALID_HEADER = "invalid_header", "invalid guard header"
    REPUBLISH_FAILED = "republish_failed", "retry could not be published"


class Status(models.TextChoices):
    """Where a dead letter stands: waiting, replayed, discarded or not replayable."""

    DEAD = "dead", "dead"
    REPLAYED = "replayed", "replayed"
    DISCARDED = "discarded", "discarded"
    UNROUTABLE = "unroutable", "unroutable"


#: Statuses from which a dead letter may be replayed or discarded.
OPEN_STATUSES = (Status.DEAD, Status.UNROUTABLE)


class ReplayOutcome(models.TextChoices):
    """How a replay of a dead letter ran, as the worker that ran it reports."""

    PUBLISHED = "published", "published, not started"
    STARTED = "started", "started"
    RETRYING = "retrying", "retrying"
    SUCCEEDED = "succeeded", "succeeded"
    FAILED = "failed", "failed"
    #: The replay's idempotency key had already succeeded: the body did not run again.
    SKIPPED = "skipped", "skipped (already succeeded)"


#: Outcomes that a later delivery of the same replay does not turn back into a running one.
FINAL_OUTCOMES = (ReplayOutcome.SUCCEEDED, ReplayOutcome.FAILED, ReplayOutcome.SKIPPED)


class DeadLetterQuerySet(models.QuerySet["DeadLetter"]):
    """Dead letters by state, and every change of state (called by the ``dlq`` services)."""

    def open(self) -> DeadLetterQuerySet:
        """Dead letters still waiting for an operator: dead, or unroutable at a replay."""
        return self.filter(status__in=OPEN_STATUSES)

    def set_status(self, status: Status, reason: str) -> int:
        """Move these rows to ``status``, saying why; return how many changed."""
        return self.update(status=status, status_reason=reason)


class DeadLetter(models.Model):
    """One final failure of a task: everything needed to inspect it and to replay it."""

    Reason = Reason
    Status = Status

    task_name = models.CharField(max_length=255)
    task_id = models.CharField(max_length=255, db_index=True)
    queue = models.CharField(max_length=255, blank=True)
    args = models.JSONField(default=list, blank=True)
    kwargs = models.JSONField(default=dict, blank=True)
    #: The message's custom headers (the ``celery_guard`` header among them).
    headers = models.JSONField(default=dict, blank=True)
    #: Celery publish options to replay with (priority, time limits, expires, exchange...).
    options = models.JSONField(default=dict, blank=True)
    # NULL, not "": "no key" / "no tenant" must differ from an empty value in filters.
    idempotency_key = models.CharField(max_length=255, null=True, blank=True)  # noqa: DJ001
    tenant = models.CharField(max_length=255, null=True, blank=True)  # noqa: DJ001
    reason = models.CharField(max_length=32, choices=Reason.choices)
    exception_class = models.CharField(max_length=255, blank=True)
    message = models.TextField(blank=True)
    traceback = models.TextField(blank=True)
    attempts = models.PositiveIntegerField(default=0)
    #: One entry per failed attempt: ``{"at", "attempt", "error", "message", "kind", "delay"}``.
    history = models.JSONField(default=list, blank=True)
    first_enqueued_at = models.DateTimeField(null=True, blank=True)
    failed_at = models.DateTimeField(default=timezone.now)
    hostname = models.CharField(max_length=255, blank=True)
    guarded = models.BooleanField(default=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.DEAD)
    sentry_event_id = models.CharField(max_length=64, null=True, blank=True)  # noqa: DJ001
    #: Why the row has its status (unroutable reason, discard reason...), set by the DLQ tools.
    status_reason = models.TextField(blank=True)
    #: Id of the dead letter whose replay this failure is (from the guard header's
    #: ``replay_of``). A plain integer, not a foreign key: the original may have been purged.
    replay_of = models.BigIntegerField(null=True, blank=True)

    objects = DeadLetterQuerySet.as_manager()

    class Meta:
        ordering = ["-failed_at", "-id"]
        # Every changelist filter is "WHERE <field> = ... ORDER BY failed_at DESC, id DESC":
        # each composite index serves the filter and the default ordering in one scan.
        indexes = [
            models.Index(fields=["task_name", "-failed_at", "-id"], name="cg_dl_task_name"),
            models.Index(fields=["reason", "-failed_at", "-id"], name="cg_dl_reason"),
            models.Index(
                fields=["exception_class", "-failed_at", "-id"], name="cg_dl_exception_class"
            ),
            models.Index(fields=["queue", "-failed_at", "-id"], name="cg_dl_queue"),
            models.Index(fields=["status", "-failed_at", "-id"], name="cg_dl_status"),
            models.Index(fields=["-failed_at", "-id"], name="cg_dl_failed_at"),
            models.Index(fields=["idempotency_key"], name="cg_dl_idempotency_key"),
            models.Index(fields=["replay_of"], name="cg_dl_replay_of"),
        ]
        permissions = [
            ("replay_deadletter", "Can replay dead letters"),
            ("edit_deadletter", "Can edit the arguments of dead letters, replay and reveal them"),
            ("discard_deadletter", "Can discard dead letters"),
        ]

    def __str__(self) -> str:
        return f"{self.task_name}[{self.task_id}] {self.reason}"


class DeadLetterReplay(models.Model):
    """One replay of a dead letter: its task id, who replayed it and when, and how it ran.

    Written in the same transaction that claims the dead letter, before the publish; deleted
    again if the publish fails. A replay that fails for good writes a new ``DeadLetter`` whose
    ``task_id`` is this ``task_id`` and whose ``replay_of`` is ``dead_letter_id``. The worker
    that runs the replay sets ``outcome`` (see ``celery_guard.dlq.receivers``).
    """

    Outcome = ReplayOutcome

    dead_letter = models.ForeignKey(DeadLetter, on_delete=models.CASCADE, related_name="replays")
    task_id = models.CharField(max_length=255, db_index=True)
    replayed_by = models.CharField(max_length=150, blank=True)
    replayed_at = models.DateTimeField(default=timezone.now)
    #: True when the operator edited the arguments (``args``/``kwargs`` then hold what ran).
    edited = models.BooleanField(default=False)
    args = models.JSONField(default=list, blank=True)
    kwargs = models.JSONField(default=dict, blank=True)
    outcome = models.CharField(
        max_length=16, choices=ReplayOutcome.choices, default=ReplayOutcome.PUBLISHED
    )
    #: When the run reached ``succeeded`` or ``failed`` (worker time).
    finished_at = models.DateTimeField(null=True, blank=True)
    #: When a worker last changed ``outcome``.
    updated_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-replayed_at", "-id"]

    def __str__(self) -> str:
        return f"replay of {self.dead_letter_id} as {self.task_id}"
