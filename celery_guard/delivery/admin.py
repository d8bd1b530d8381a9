"""Admin of the outbox and the database schedule: read-only, pending rows with age and error."""

from __future__ import annotations

from django.contrib import admin
from django.utils import timezone

from celery_guard.core.admin import ReadOnlyAdmin
from celery_guard.delivery.models import OutboxMessage


@admin.register(OutboxMessage)
class OutboxMessageAdmin(ReadOnlyAdmin):
    """Outbox rows and messages of the database schedule (``prepared``), as the poller sees them."""

    list_display = (
        "task_name",
        "task_id",
        "state",
        "kind",
        "age",
        "due_at",
        "attempt",
        "publish_attempts",
        "last_error",
        "queue",
        "dispatched_at",
    )
    list_filter = ("state", "prepared", "task_name", "queue")
    search_fields = ("task_id", "task_name", "idempotency_key")
    ordering = ("due_at",)

    @admin.display(description="kind", ordering="prepared")
    def kind(self, obj: OutboxMessage) -> str:
        """``scheduled`` (a delayed message) or ``outbox`` (a committed call)."""
        return "scheduled" if obj.prepared else "outbox"

    @admin.display(description="age", ordering="created_at")
    def age(self, obj: OutboxMessage) -> str:
        """Seconds since the row was written (how long a pending row has waited)."""
        return f"{(timezone.now() - obj.created_at).total_seconds():.0f}s"
