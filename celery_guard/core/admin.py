"""The read-only ``ModelAdmin`` base that every celery_guard admin page shares."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest


class ReadOnlyAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """A changelist nobody can add to, change or delete from.

    The rows are written by workers, beats and the ledger; operators change them only
    through the dedicated, permission-gated actions and commands.
    """

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        """Rows are written by celery_guard itself."""
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        """Stored fields are never edited through the admin."""
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        """Rows leave through ``celery_guard purge`` or the gated actions, never a bare delete."""
        return False
