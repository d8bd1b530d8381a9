"""Django admin of celery_guard: the idempotency ledger, the beat lease and fire history.

The dead-letter queue's admin lives in :mod:`celery_guard.dlq_admin`, registered on import.
"""

from __future__ import annotations

import logging

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils import timezone

from celery_guard import dlq_admin  # noqa: F401  (registers the dead-letter admin)
from celery_guard.admin_base import ReadOnlyAdmin
from celery_guard.ledger import DatabaseLedger
from celery_guard.models import BeatFire, BeatLease, IdempotencyRecord


@admin.register(BeatLease)
class BeatLeaseAdmin(ReadOnlyAdmin):
    """One row per lock name: who leads, since when, last renewal, whether it is live."""

    list_display = ("name", "holder", "token", "acquired_at", "renewed_at", "expires_at", "live")
    search_fields = ("name", "holder")

    @admin.display(boolean=True, description="live")
    def live(self, obj: BeatLease) -> bool:
        """Whether the lease is unexpired (by this web server's clock)."""
        return obj.expires_at > timezone.now()


@admin.register(BeatFire)
class BeatFireAdmin(ReadOnlyAdmin):
    """The fire history of every entry: fired, skipped, missed or failed slots."""

    list_display = (
        "entry",
        "slot",
        "status",
        "token",
        "holder",
        "task_id",
        "fired_at",
        "started_at",
        "finished_at",
        "detail",
    )
    list_filter = ("status", "entry")
    search_fields = ("entry", "task_id")
    date_hierarchy = "slot"


logger = logging.getLogger(__name__)

#: Permission that gates the "release keys" action (``celery_guard.<codename>``).
RELEASE_PERMISSION = "celery_guard.release_idempotencyrecord"


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
        "expires_at",
        "updated_at",
    )
    list_filter = ("state", "task_name")
    search_fields = ("key", "task_id")
    ordering = ("-updated_at",)
    actions = ["release_keys"]

    @admin.display(description="state", ordering="state")
    def state_detail(self, obj: IdempotencyRecord) -> str:
        """The state; for ``pending``, whether the publish is confirmed (see the model)."""
        return obj.state_detail()

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
