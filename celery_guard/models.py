"""Database models of celery_guard: dead letters, delivery markers, the idempotency ledger,
the beat lease and fires."""

from __future__ import annotations

from typing import Any

from django.db import models
from django.utils import timezone


class DeadLetter(models.Model):
    """One final failure of a task: everything needed to inspect it and to replay it."""

    class Reason(models.TextChoices):
        PERMANENT = "permanent", "permanent error"
        EXHAUSTED = "exhausted", "attempts exhausted"
        DEADLINE = "deadline", "deadline passed"
        WORKER_LOST = "worker_lost", "worker lost too often"
        TIMEOUT = "timeout", "hard time limit"
        REJECTED = "rejected", "rejected by the task"
        FAILED = "failed", "unguarded task failed"

    class Status(models.TextChoices):
        DEAD = "dead", "dead"
        REPLAYED = "replayed", "replayed"
        DISCARDED = "discarded", "discarded"
        UNROUTABLE = "unroutable", "unroutable"

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

    def replay_options(self) -> dict[str, Any]:
        """Keyword arguments for ``app.send_task(self.task_name, **...)`` to run it again.

        The replay is a new first publish: a fresh guard header (attempt 1, first enqueue
        now) that keeps the feature fields of the original (priority, idempotency key...).
        """
        from celery_guard import failures

        return failures.replay_options(self)


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


class BeatLease(models.Model):
    """The leadership lease of one guarded beat cluster (one row per lock name).

    Acquired and renewed with conditional updates by ``celery_guard.locks``; whoever holds an
    unexpired row is the only beat that dispatches. ``token`` grows on every change of holder
    (a fencing token), so a fire record tells which leadership term published it.
    """

    name = models.CharField(max_length=200, unique=True)
    holder = models.CharField(max_length=255, blank=True, help_text="host:pid:uuid of the holder")
    token = models.BigIntegerField(default=0, help_text="fencing token, +1 per change of holder")
    acquired_at = models.DateTimeField(help_text="when the current holder took the lease")
    renewed_at = models.DateTimeField(help_text="last successful renewal (database time)")
    expires_at = models.DateTimeField(help_text="the lease is free for others after this")

    class Meta:
        verbose_name = "beat lease"
        verbose_name_plural = "beat leases"

    def __str__(self) -> str:
        return f"{self.name} held by {self.holder or '(nobody)'} (token {self.token})"


class BeatFire(models.Model):
    """One schedule slot of one beat entry: fired, skipped or missed; unique per slot.

    The unique ``(entry, slot)`` pair is what makes a slot fire at most once: a beat inserts
    the row before it publishes, and a duplicate insert means the slot is already taken.
    """

    FIRED = "fired"
    SKIPPED = "skipped"
    MISSED = "missed"
    FAILED = "failed"
    STATUSES = [
        (FIRED, "fired"),
        (SKIPPED, "skipped (overlap policy)"),
        (MISSED, "missed (catch-up policy)"),
        (FAILED, "publish failed"),
    ]

    entry = models.CharField(max_length=200, help_text="the PeriodicTask name")
    slot = models.DateTimeField(help_text="the due time of this run, UTC")
    status = models.CharField(max_length=16, choices=STATUSES)
    token = models.BigIntegerField(help_text="fencing token of the leader that wrote this row")
    holder = models.CharField(max_length=255, blank=True)
    task = models.CharField(max_length=200, blank=True)
    task_id = models.CharField(max_length=255, blank=True)
    fired_at = models.DateTimeField(help_text="when the leader wrote this row")
    started_at = models.DateTimeField(null=True, blank=True, help_text="worker started the run")
    finished_at = models.DateTimeField(null=True, blank=True, help_text="worker finished the run")
    detail = models.CharField(max_length=255, blank=True)

    class Meta:
        verbose_name = "beat fire"
        verbose_name_plural = "beat fires"
        constraints = [
            models.UniqueConstraint(fields=["entry", "slot"], name="celery_guard_beatfire_slot")
        ]
        indexes = [models.Index(fields=["entry", "-slot"], name="celery_guard_beatfire_recent")]
        ordering = ["-slot"]

    def __str__(self) -> str:
        return f"{self.entry} @ {self.slot.isoformat()}: {self.status}"


class IdempotencyRecord(models.Model):
    """One idempotency key: who holds it, in which state, until when.

    Rows are written only by :class:`celery_guard.ledger.DatabaseLedger`, with inserts that
    rely on the unique key and conditional updates, so concurrent producers and workers never
    overwrite each other's decisions.
    """

    class State(models.TextChoices):
        PENDING = "pending", "pending"
        RUNNING = "running", "running"
        SUCCEEDED = "succeeded", "succeeded"
        FAILED = "failed", "failed"
        RELEASED = "released", "released"

    key = models.CharField(max_length=200, unique=True)
    task_name = models.CharField(max_length=200)
    task_id = models.CharField(max_length=255)
    fingerprint = models.CharField(max_length=64)
    state = models.CharField(max_length=16, choices=State.choices, default=State.PENDING)
    fencing_token = models.PositiveBigIntegerField(default=0)
    owner = models.CharField(max_length=255, blank=True, default="")
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField()
    updated_at = models.DateTimeField()
    expires_at = models.DateTimeField(db_index=True)

    class Meta:
        verbose_name = "idempotency record"
        permissions = [("release_idempotencyrecord", "Can release idempotency keys")]

    def __str__(self) -> str:
        return f"{self.key} ({self.state_detail()})"

    def state_detail(self) -> str:
        """The state, telling the kinds of ``pending`` apart (see ``celery_guard.ledger``).

        An unconfirmed claim's ``lease_expires_at`` is its publish deadline; a run that gave
        its lease back for a Celery retry keeps its owner.
        """
        if self.state != "pending":
            return str(self.state)
        if self.owner:
            return "pending (retry)"
        if self.lease_expires_at is not None:
            return "pending (publish unconfirmed)"
        return "pending (published)"


class DeadLetterReplay(models.Model):
    """One replay of a dead letter: its task id, who replayed it and when, and how it ran.

    Written in the same transaction that claims the dead letter, before the publish; deleted
    again if the publish fails. A replay that fails for good writes a new ``DeadLetter`` whose
    ``task_id`` is this ``task_id`` and whose ``replay_of`` is ``dead_letter_id``. The worker
    that runs the replay sets ``outcome`` (see ``celery_guard.receivers``).
    """

    PUBLISHED = "published"
    STARTED = "started"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    OUTCOMES = [
        (PUBLISHED, "published, not started"),
        (STARTED, "started"),
        (RETRYING, "retrying"),
        (SUCCEEDED, "succeeded"),
        (FAILED, "failed"),
    ]

    dead_letter = models.ForeignKey(DeadLetter, on_delete=models.CASCADE, related_name="replays")
    task_id = models.CharField(max_length=255, db_index=True)
    replayed_by = models.CharField(max_length=150, blank=True)
    replayed_at = models.DateTimeField(default=timezone.now)
    #: True when the operator edited the arguments (``args``/``kwargs`` then hold what ran).
    edited = models.BooleanField(default=False)
    args = models.JSONField(default=list, blank=True)
    kwargs = models.JSONField(default=dict, blank=True)
    outcome = models.CharField(max_length=16, choices=OUTCOMES, default=PUBLISHED)
    #: When the run reached ``succeeded`` or ``failed`` (worker time).
    finished_at = models.DateTimeField(null=True, blank=True)
    #: When a worker last changed ``outcome``.
    updated_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-replayed_at", "-id"]

    def __str__(self) -> str:
        return f"replay of {self.dead_letter_id} as {self.task_id}"
