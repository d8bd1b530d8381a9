"""Admin of bulk runs: the runs list, the run card, CSV of failed items, retry and cancel."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from typing import Any

from django.contrib import admin, messages
from django.contrib.admin.utils import unquote
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db.models import Count, QuerySet
from django.http import (
    Http404,
    HttpRequest,
    HttpResponse,
    HttpResponseRedirect,
    StreamingHttpResponse,
)
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html
from django.utils.safestring import SafeString
from django.views.decorators.http import require_POST

from celery_guard.core.admin import ReadOnlyAdmin
from celery_guard.runs import launch
from celery_guard.runs.models import FINISHED_RUN_STATUSES, BulkRun, BulkRunItem, ItemStatus

#: Permissions (``app_label.codename``) of the run tools.
RETRY_PERMISSION = "celery_guard.retry_bulkrun"
CANCEL_PERMISSION = "celery_guard.cancel_bulkrun"
GATED_ACTIONS = {"retry_failed_selected": RETRY_PERMISSION, "cancel_selected": CANCEL_PERMISSION}
#: Item rows per page of the card.
ITEMS_PER_PAGE = 50


class _Echo:
    """A file-like object whose ``write`` returns the line (for a streamed CSV)."""

    def write(self, value: str) -> str:
        return value


def _progress_bar(run: BulkRun) -> SafeString:
    percent = 100 * run.done // run.total if run.total else 100
    return format_html(
        '<div class="cg-progress" title="{}%"><div style="width:{}%"></div></div> {}%',
        percent,
        percent,
        percent,
    )


def _rate_and_eta(run: BulkRun) -> tuple[float | None, float | None]:
    """Items per second since the first item started, and the seconds left at that rate."""
    if run.started_at is None or not run.done:
        return None, None
    end = run.finished_at or timezone.now()
    elapsed = max((end - run.started_at).total_seconds(), 0.001)
    rate = run.done / elapsed
    return rate, (None if run.finished_at else run.pending / rate)


@admin.register(BulkRun)
class BulkRunAdmin(ReadOnlyAdmin):
    """Runs as their items report: read-only, with gated retry and cancel."""

    list_display = (
        "id",
        "name",
        "short_task_name",
        "status",
        "progress",
        "total",
        "succeeded",
        "failed",
        "initiator",
        "created_at",
        "finished_at",
    )
    list_display_links = ("id", "name")
    list_filter = ("status",)
    search_fields = ("=name", "=task_name")
    ordering = ("-created_at", "-id")
    list_per_page = 50
    actions = ["retry_failed_selected", "cancel_selected"]
    change_form_template = "admin/celery_guard/bulkrun/card.html"

    def lookup_allowed(self, lookup: str, value: str, request: Any = None) -> bool:
        """Only the status filter filters by URL."""
        return lookup in {"status", "status__exact"}

    def has_retry_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        """Retry failed items: ``celery_guard.retry_bulkrun``."""
        return bool(request.user.has_perm(RETRY_PERMISSION))

    def has_cancel_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        """Cancel: ``celery_guard.cancel_bulkrun``."""
        return bool(request.user.has_perm(CANCEL_PERMISSION))

    @admin.display(description="task", ordering="task_name")
    def short_task_name(self, obj: BulkRun) -> str:
        """The task's function name without its module."""
        return obj.task_name.rsplit(".", 1)[-1]

    @admin.display(description="progress")
    def progress(self, obj: BulkRun) -> SafeString:
        """A progress bar: final items of the total."""
        return _progress_bar(obj)

    def changelist_view(self, request: HttpRequest, extra_context: Any = None) -> HttpResponse:
        """Refuse (403) a POST naming a gated action the user may not run."""
        named = request.POST.getlist("action") if request.method == "POST" else []
        if any(
            action in GATED_ACTIONS and not request.user.has_perm(GATED_ACTIONS[action])
            for action in named
        ):
            raise PermissionDenied
        return super().changelist_view(request, extra_context)

    # -- the card ----------------------------------------------------------------------------

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        """The run card: progress, counters, rate, ETA, errors by class, item rows."""
        run = self._get_run(request, object_id)
        items = BulkRunItem.objects.filter(run_id=run.pk).order_by("seq")
        status = request.GET.get("item_status") or ""
        error = request.GET.get("error_class")
        if status in ItemStatus.values:
            items = items.filter(status=status)
        if error is not None:
            items = items.filter(status=ItemStatus.FAILED, error_class=error)
        page = Paginator(items, ITEMS_PER_PAGE).get_page(request.GET.get("page"))
        groups = (
            BulkRunItem.objects.filter(run_id=run.pk, status=ItemStatus.FAILED)
            .values("error_class")
            .annotate(count=Count("id"))
            .order_by("-count", "error_class")
        )
        rate, eta = _rate_and_eta(run)
        context = {
            **self.admin_site.each_context(request),
            **(extra_context or {}),
            "opts": self.opts,
            "original": run,
            "run": run,
            "title": str(run),
            "progress_bar": _progress_bar(run),
            "rate": rate,
            "eta": eta,
            "groups": list(groups),
            "page": page,
            "item_status": status,
            "error_class": error,
            "item_statuses": ItemStatus.choices,
            "children": list(run.retries.order_by("pk").values_list("pk", flat=True)),
            "can_retry": self.has_retry_permission(request) and run.failed > 0,
            "can_cancel": self.has_cancel_permission(request)
            and run.status not in FINISHED_RUN_STATUSES,
        }
        return TemplateResponse(request, self.change_form_template, context)

    def get_urls(self) -> list[Any]:
        """The card's tool views, before the model admin's own URLs."""
        view = self.admin_site.admin_view
        return [
            path(
                "<path:object_id>/retry/",
                view(require_POST(self.retry_view)),
                name="celery_guard_bulkrun_retry",
            ),
            path(
                "<path:object_id>/cancel/",
                view(require_POST(self.cancel_view)),
                name="celery_guard_bulkrun_cancel",
            ),
            path(
                "<path:object_id>/failed.csv",
                view(self.failed_csv_view),
                name="celery_guard_bulkrun_failed_csv",
            ),
            *super().get_urls(),
        ]

    def _get_run(self, request: HttpRequest, object_id: str) -> BulkRun:
        run: BulkRun | None = self.get_object(request, unquote(object_id))
        if run is None:
            raise Http404(f"no bulk run {object_id!r}")
        return run

    def _card(self, run: BulkRun) -> HttpResponseRedirect:
        return HttpResponseRedirect(reverse("admin:celery_guard_bulkrun_change", args=[run.pk]))

    def _retry(self, request: HttpRequest, run: BulkRun) -> None:
        try:
            child = launch.retry_failed(run, initiator=request.user)
        except ValueError as exc:
            self.message_user(request, str(exc), messages.WARNING)
            return
        self.message_user(
            request, f"Run #{run.pk}: {child.total} failed item(s) retried as run #{child.pk}."
        )

    def _cancel(self, request: HttpRequest, run: BulkRun) -> None:
        count = launch.cancel(run, initiator=request.user)
        self.message_user(request, f"Run #{run.pk} cancelled: {count} pending item(s).")

    def retry_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        """POST: start a child run of the failed items."""
        if not self.has_retry_permission(request):
            raise PermissionDenied
        run = self._get_run(request, object_id)
        self._retry(request, run)
        return self._card(run)

    def cancel_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        """POST: cancel the run's pending items."""
        if not self.has_cancel_permission(request):
            raise PermissionDenied
        run = self._get_run(request, object_id)
        self._cancel(request, run)
        return self._card(run)

    def failed_csv_view(self, request: HttpRequest, object_id: str) -> StreamingHttpResponse:
        """The failed items as CSV (streamed: a run may have 100,000 of them)."""
        run = self._get_run(request, object_id)
        rows = (
            BulkRunItem.objects.filter(run_id=run.pk, status=ItemStatus.FAILED)
            .order_by("seq")
            .values_list(
                "seq", "task_id", "attempts", "error_class", "error_message", "dead_letter_id"
            )
        )

        def lines() -> Iterator[str]:
            writer = csv.writer(_Echo())
            yield writer.writerow(
                ["item", "task_id", "attempts", "error_class", "error_message", "dead_letter"]
            )
            for row in rows.iterator(chunk_size=2000):
                yield writer.writerow(row)

        response = StreamingHttpResponse(lines(), content_type="text/csv")
        response["Content-Disposition"] = f'attachment; filename="run-{run.pk}-failed.csv"'
        return response

    @admin.action(description="Retry the failed items of the selected runs", permissions=["retry"])
    def retry_failed_selected(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        """One child run per selected run with failed items."""
        for run in queryset.filter(failed__gt=0):
            self._retry(request, run)

    @admin.action(description="Cancel the selected runs", permissions=["cancel"])
    def cancel_selected(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        """Cancel each selected run that has not finished."""
        for run in queryset.exclude(status__in=FINISHED_RUN_STATUSES):
            self._cancel(request, run)
