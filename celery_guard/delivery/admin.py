"""Admin of the outbox and the database schedule: read-only, pending rows with age and error."""

from __future__ import annotations

import logging
from datetime import datetime
from datetime import timezone as dt_timezone
from typing import Any, cast

from celery import current_app
from django.contrib import admin
from django.http import HttpRequest, HttpResponse
from django.utils import timezone

from celery_guard.core import headers
from celery_guard.core.admin import ReadOnlyAdmin
from celery_guard.delivery import schedule
from celery_guard.delivery.models import OutboxMessage

logger = logging.getLogger(__name__)

#: Scheduled Redis messages read for the changelist (the next ones by due time).
REDIS_SCAN = 1000
#: Scheduled Redis messages shown.
REDIS_SHOWN = 100


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
    change_list_template = "admin/celery_guard/outboxmessage/change_list.html"

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        """The rows, and under them the next messages of the Redis schedule (if it is used)."""
        context = dict(extra_context or {})
        app = current_app._get_current_object()
        if schedule.backend_name(app) == "redis":
            wanted = request.GET.get("scheduled", "").strip()
            # Not a changelist filter: the admin rejects unknown query parameters.
            query = request.GET.copy()
            query.pop("scheduled", None)
            cast(Any, request).GET = query
            try:
                redis_schedule = schedule.RedisSchedule(app)
                entries = [
                    {**entry, "due_at": datetime.fromtimestamp(entry["due"], tz=dt_timezone.utc)}
                    for entry in redis_schedule.entries(REDIS_SCAN)
                    if not wanted or wanted in (entry["task"], entry["queue"])
                ]
                context.update(
                    redis_schedule=entries[:REDIS_SHOWN],
                    redis_schedule_size=redis_schedule.size(),
                    redis_schedule_filter=wanted,
                )
            except Exception:
                logger.exception("celery_guard: cannot read the Redis schedule")
        return super().changelist_view(request, extra_context=context)

    @admin.display(description="kind", ordering="prepared")
    def kind(self, obj: OutboxMessage) -> str:
        """``beat`` (a fired slot), ``scheduled`` (a delayed message) or ``outbox`` (a call)."""
        guard_header = (obj.headers or {}).get(headers.HEADER)
        if isinstance(guard_header, dict) and guard_header.get(headers.BEAT):
            return "beat"
        return "scheduled" if obj.prepared else "outbox"

    @admin.display(description="age", ordering="created_at")
    def age(self, obj: OutboxMessage) -> str:
        """Seconds since the row was written (how long a pending row has waited)."""
        return f"{(timezone.now() - obj.created_at).total_seconds():.0f}s"
