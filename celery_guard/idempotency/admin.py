"""Admin of the idempotency ledger: read-only, with a "release keys" action."""

from __future__ import annotations

import logging
from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from celery_guard.core.admin import ReadOnlyAdmin
from celery_guard.idempotency import ledger
from celery_guard.idempotency.models import IdempotencyRecord, never_started

logger = logging.getLogger(__name__)

#: Permission that gates the "release keys" action (``celery_guard.<codename>``).
RELEASE_PERMISSION = "celery_guard.release_idempotencyrecord"


class NeverStartedFilter(admin.SimpleListFilter):
    """Keys claimed and published but never started by their start-by time (lost messages)."""

    title = "start"
    parameter_name = "start"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        """The one choice: claimed, never started."""
        return [("never", "claimed, never started")]

    def queryset(
        self, request: HttpRequest, queryset: QuerySet[IdempotencyRecord]
    ) -> QuerySet[IdempotencyRecord]:
        """Only the keys past their start-by time when the choice is made."""
        return queryset.filter(never_started()) if self.value() == "never" else queryset


@admin.register(IdempotencyRecord)
class IdempotencyRecordAdmin(ReadOnlyAdmin):
    """The ledger as written by the workers; operators may only release keys."""

    list_display = (
        "key",
        "state_detail",
        "task_name",
        "task_id",
        "fencing_token",
        "owner",
        "lease_expires_at",
        "start_by",
        "expires_at",
        "updated_at",
    )
    list_filter = ("state", NeverStartedFilter, "task_name")
    search_fields = ("key", "task_id")
    ordering = ("-updated_at",)
    actions = ["release_keys"]

    @admin.display(description="state", ordering="state")
    def state_detail(self, obj: IdempotencyRecord) -> str:
        """The state; for ``pending``, confirmed or not, started or lost (see the model)."""
        return obj.state_detail()

    def has_release_permission(self, request: HttpRequest) -> bool:
        """Whether the user may release keys (``celery_guard.release_idempotencyrecord``)."""
        return bool(request.user.has_perm(RELEASE_PERMISSION))

    @admin.action(permissions=["release"], description="Release the selected keys")
    def release_keys(self, request: HttpRequest, queryset: QuerySet[IdempotencyRecord]) -> None:
        """Free the selected keys so a new call with them runs again."""
        store = ledger.DatabaseLedger()  # the rows shown are the database ledger's
        released = 0
        for record in queryset:
            done = store.release(record.key)
            released += done
            logger.info(
                "celery_guard: admin user %s %s key %r",
                request.user,
                "released" if done else "found already released",
                record.key,
            )
        self.message_user(
            request, f"Released {released} of {queryset.count()} key(s).", messages.SUCCESS
        )
