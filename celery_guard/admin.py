"""Django admin: read-only views of the beat lease (current leaders) and the fire history."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest
from django.utils import timezone

from celery_guard.models import BeatFire, BeatLease


class ReadOnlyAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """A changelist that nobody can add to, change or delete from: the beats write these."""

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        """Rows are written by the beats only."""
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        """Rows are written by the beats only."""
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        """History is kept; delete old rows with a query or a periodic task of your own."""
        return False


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
