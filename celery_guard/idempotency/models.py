"""The database idempotency ledger's record of each key."""

from __future__ import annotations

from django.db import models
from django.db.models import Q
from django.utils import timezone


class KeyState(models.TextChoices):
    """States of an idempotency key, in every ledger backend (see ``idempotency.ledger``)."""

    PENDING = "pending", "pending"
    RUNNING = "running", "running"
    SUCCEEDED = "succeeded", "succeeded"
    FAILED = "failed", "failed"
    RELEASED = "released", "released"


def never_started() -> Q:
    """Records of confirmed claims past their start-by time: claimed, never started."""
    return Q(
        state=KeyState.PENDING,
        owner="",
        lease_expires_at__isnull=True,
        start_by__lte=timezone.now(),
    )


class IdempotencyRecord(models.Model):
    """One idempotency key: who holds it, in which state, until when.

    Rows are written only by :class:`celery_guard.idempotency.ledger.DatabaseLedger`, with
    inserts that rely on the unique key and conditional updates, so concurrent producers and
    workers never overwrite each other's decisions.
    """

    State = KeyState

    key = models.CharField(max_length=200, unique=True)
    task_name = models.CharField(max_length=200)
    task_id = models.CharField(max_length=255)
    fingerprint = models.CharField(max_length=64)
    state = models.CharField(max_length=16, choices=State.choices, default=State.PENDING)
    fencing_token = models.PositiveBigIntegerField(default=0)
    owner = models.CharField(max_length=255, blank=True, default="")
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    #: A confirmed claim's start-by time: no start by then means its message was lost.
    start_by = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField()
    updated_at = models.DateTimeField()
    expires_at = models.DateTimeField(db_index=True)

    class Meta:
        verbose_name = "idempotency record"
        permissions = [("release_idempotencyrecord", "Can release idempotency keys")]

    def __str__(self) -> str:
        return f"{self.key} ({self.state_detail()})"

    def state_detail(self) -> str:
        """The state, telling the kinds of ``pending`` apart (see ``idempotency.ledger``).

        An unconfirmed claim's ``lease_expires_at`` is its publish deadline; a confirmed
        claim past its ``start_by`` was never started (its message was lost); a run that
        gave its lease back for a Celery retry keeps its owner.
        """
        if self.state != KeyState.PENDING:
            return str(self.state)
        if self.owner:
            return "pending (retry)"
        if self.lease_expires_at is not None:
            return "pending (publish unconfirmed)"
        if self.start_by is not None and self.start_by <= timezone.now():
            return "pending (claimed, never started)"
        return "pending (published)"
