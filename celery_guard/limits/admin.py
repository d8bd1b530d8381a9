"""Admin of task policies: pause, resume and override limits of a task type at run time.

Editing needs ``celery_guard.change_taskpolicy``; every change (the form or an action) is in
the admin log. Workers apply it within ``CELERY_GUARD_POLICY_REFRESH`` seconds.
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db import transaction
from django.db.models import QuerySet
from django.http import HttpRequest

from celery_guard.core import audit
from celery_guard.limits import services
from celery_guard.limits.models import TaskPolicy


@admin.register(TaskPolicy)
class TaskPolicyAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """One row per task type with a policy; pause/resume in bulk."""

    list_display = ("task_name", "paused", "concurrency", "rate", "priority", "note", "updated_at")
    list_filter = ("paused",)
    search_fields = ("task_name", "note")
    actions = ("pause_selected", "resume_selected")

    def save_model(self, request: HttpRequest, obj: Any, form: Any, change: bool) -> None:
        """Save through the policy service (the admin log entry is the admin's own)."""
        services.save_policy(obj)

    def _set(self, request: HttpRequest, queryset: QuerySet[Any], paused: bool) -> None:
        verb = "paused" if paused else "resumed"
        with transaction.atomic():
            rows = [
                services.set_paused(name, paused)
                for name in queryset.values_list("task_name", flat=True)
            ]
            audit.log_changes(request.user, [(row, f"{verb} (admin action)") for row in rows])
        self.message_user(
            request,
            f"{len(rows)} task type(s) {verb}; workers apply it within a few seconds.",
            messages.SUCCESS,
        )

    @admin.action(description="Pause selected task types", permissions=["change"])
    def pause_selected(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        """Defer every new delivery of the selected task types until they are resumed."""
        self._set(request, queryset, True)

    @admin.action(description="Resume selected task types", permissions=["change"])
    def resume_selected(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        """Let the deferred and new deliveries of the selected task types run again."""
        self._set(request, queryset, False)
