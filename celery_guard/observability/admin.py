"""The admin dashboard (``/admin/celery_guard/dashboard/``) and the alerts' list."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from django.contrib import admin
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import reverse

from celery_guard.core.admin import ReadOnlyAdmin
from celery_guard.observability import status
from celery_guard.observability.models import Alert, Dashboard

#: Chart size (pixels) of the per-minute sparklines.
CHART_W, CHART_H = 180, 28


def sparkline(values: list[float | None]) -> str:
    """SVG polyline points of ``values`` scaled into the chart (gaps drawn at zero)."""
    numbers = [v or 0.0 for v in values]
    top = max(numbers, default=0.0) or 1.0
    step = CHART_W / max(len(numbers) - 1, 1)
    return " ".join(
        f"{i * step:.1f},{CHART_H - 2 - (v / top) * (CHART_H - 4):.1f}"
        for i, v in enumerate(numbers)
    )


def dlq_link(**filters: str) -> str:
    """The dead-letter changelist filtered to open dead letters matching ``filters``."""
    query = {"status__exact": "dead", **{f"{k}__exact": v for k, v in filters.items() if v}}
    return reverse("admin:celery_guard_deadletter_changelist") + "?" + urlencode(query)


@admin.register(Dashboard)
class DashboardAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """Renders the dashboard instead of a changelist (needs ``view_dashboard``)."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        """Nothing to add."""
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        """Nothing to change."""
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        """Nothing to delete."""
        return False

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        """The dashboard: one row per queue, dead letters by task, beat leaders, alerts."""
        if not self.has_view_permission(request):
            from django.core.exceptions import PermissionDenied

            raise PermissionDenied
        figures = status.figures()
        queues = [
            {
                "row": row,
                "throughput_points": sparkline([float(v) for v in row.per_minute]),
                "failure_points": sparkline(list(row.failures_per_minute)),
                "dlq_url": dlq_link(queue=row.queue),
            }
            for row in figures.queues
        ]
        dead = [
            {"count": d, "url": dlq_link(task_name=d.task_name, queue=d.queue)}
            for d in figures.dead_letters
        ]
        context = {
            **self.admin_site.each_context(request),
            "title": "Celery guard dashboard",
            "opts": self.model._meta,
            "figures": figures,
            "queues": queues,
            "dead": dead,
            "chart_w": CHART_W,
            "chart_h": CHART_H,
            "alerts_url": reverse("admin:celery_guard_alert_changelist"),
            **(extra_context or {}),
        }
        return TemplateResponse(request, "admin/celery_guard/dashboard.html", context)


@admin.register(Alert)
class AlertAdmin(ReadOnlyAdmin):
    """SLO alerts: raised and resolved by the evaluator only."""

    list_display = (
        "slo",
        "objective",
        "status",
        "value",
        "threshold",
        "breached_at",
        "raised_at",
        "resolved_at",
        "playbook_link",
    )
    list_filter = ("status", "objective")
    ordering = ("-breached_at",)

    @admin.display(description="playbook")
    def playbook_link(self, obj: Alert) -> str:
        """A link to the alert's playbook section."""
        from django.utils.html import format_html

        return str(format_html('<a href="{}" rel="noopener">playbook</a>', obj.playbook))
