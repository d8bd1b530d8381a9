"""The guarded beat's leadership lease and its record of fired schedule slots."""

from __future__ import annotations

from django.db import models


class BeatLease(models.Model):
    """The leadership lease of one guarded beat cluster (one row per lock name).

    Acquired and renewed with conditional updates by ``celery_guard.beat.lease``; whoever holds an
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


class FireStatus(models.TextChoices):
    """What became of one schedule slot of one beat entry."""

    FIRED = "fired", "fired"
    SKIPPED = "skipped", "skipped (overlap policy)"
    MISSED = "missed", "missed (catch-up policy)"
    FAILED = "failed", "publish failed"


class BeatFire(models.Model):
    """One schedule slot of one beat entry: fired, skipped or missed; unique per slot.

    The unique ``(entry, slot)`` pair is what makes a slot fire at most once: a beat inserts
    the row before it publishes, and a duplicate insert means the slot is already taken.
    """

    Status = FireStatus

    entry = models.CharField(max_length=200, help_text="the PeriodicTask name")
    slot = models.DateTimeField(help_text="the due time of this run, UTC")
    status = models.CharField(max_length=16, choices=FireStatus.choices)
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
