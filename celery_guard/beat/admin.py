"""Admin of the guarded beat: the leadership lease and the fire history (read-only)."""

from __future__ import annotations

from django.contrib import admin
from django.utils import timezone

from celery_guard.beat.models import BeatFire, BeatLease
from celery_guard.core.admin import ReadOnlyAdmin


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
