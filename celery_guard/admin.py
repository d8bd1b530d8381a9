"""Admin of celery_guard: the idempotency ledger, read-only, with a gated "release" action."""

from __future__ import annotations

import logging
from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from celery_guard.ledger import DatabaseLedger
from celery_guard.models import IdempotencyRecord

logger = logging.getLogger(__name__)

#: Permission that gates the "release keys" action (``celery_guard.<codename>``).
RELEASE_PERMISSION = "celery_guard.release_idempotencyrecord"


@admin.register(IdempotencyRecord)
class IdempotencyRecordAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """The ledger as written by the workers; operators may only release keys."""

    list_display = (
        "key",
        "state",
        "task_name",
        "task_id",
        "fencing_token",
        "owner",
        "lease_expires_at",
        "expires_at",
        "updated_at",
    )
    list_filter = ("state", "task_name")
    search_fields = ("key", "task_id")
    ordering = ("-updated_at",)
    actions = ["release_keys"]

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        """Records are written by the ledger only."""
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        """Records are written by the ledger only."""
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        """Expired records are removed by ``celery_guard purge``; live ones by release."""
        return False

    def has_release_permission(self, request: HttpRequest) -> bool:
        """Whether the user may release keys (``celery_guard.release_idempotencyrecord``)."""
        return bool(request.user.has_perm(RELEASE_PERMISSION))

    @admin.action(permissions=["release"], description="Release the selected keys")
    def release_keys(self, request: HttpRequest, queryset: QuerySet[IdempotencyRecord]) -> None:
        """Free the selected keys so a new call with them runs again."""
        store = DatabaseLedger()
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
