"""Admin of the dead-letter queue: inspect, replay, edit and replay, discard (audited)."""

from __future__ import annotations

import contextvars
import difflib
import hashlib
import json
import logging
from typing import Any
from urllib.parse import quote

from celery import current_app
from django.contrib import admin, messages
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.contrib.admin.utils import unquote
from django.core.exceptions import BadRequest, PermissionDenied
from django.db.models import Q, QuerySet
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString
from django.views.decorators.http import require_POST

from celery_guard.conf import guard_settings
from celery_guard.core import payload, redaction
from celery_guard.core.admin import ReadOnlyAdmin
from celery_guard.dlq import records, replay, services
from celery_guard.dlq.models import DeadLetter
from celery_guard.dlq.scale import (
    EstimatedCountPaginator,
    IndexedValuesFilter,
    ProbedDatesQuerySet,
)

logger = logging.getLogger(__name__)

#: Permissions (``app_label.codename``) of the side-effect tools.
REPLAY_PERMISSION = "celery_guard.replay_deadletter"
EDIT_PERMISSION = "celery_guard.edit_deadletter"
DISCARD_PERMISSION = "celery_guard.discard_deadletter"
#: Gated actions -> the permission a POST naming them needs.
GATED_ACTIONS = {"replay_selected": REPLAY_PERMISSION, "discard_selected": DISCARD_PERMISSION}
#: Unroutable reasons listed in a message after a replay (the rest are on the rows).
SHOWN_REASONS = 5
#: Rows listed on the discard page (all of them are discarded).
SHOWN_ROWS = 100
#: Longest search term taken as a dead letter id (the largest bigint has 19 digits).
MAX_ID_DIGITS = 18

# Whether the detail page being rendered shows unmasked arguments. The readonly field methods
# get no request, and the ModelAdmin instance is shared by every request: a context variable
# keeps the decision to the request (thread) that made it.
_revealing: contextvars.ContextVar[bool] = contextvars.ContextVar("cg_revealing", default=False)


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=repr)


def _summary_message(summary: replay.Summary) -> str:
    text = f"Dead letters: {summary}."
    for pk, reason in list(summary.reasons.items())[:SHOWN_REASONS]:
        text += f" #{pk}: {reason}."
    return text


def _filter_lookups(list_filter: Any, date_hierarchy: str | None) -> frozenset[str]:
    """The URL parameters that the field filters and the date hierarchy use."""
    lookups = set()
    for entry in list_filter:
        name = entry if isinstance(entry, str) else entry[0]
        lookups |= {name, f"{name}__exact", f"{name}__isnull"}
    if date_hierarchy:
        lookups |= {f"{date_hierarchy}__{part}" for part in ("year", "month", "day")}
    return frozenset(lookups)


def _digest(args: Any, kwargs: Any) -> str:
    """A fingerprint of edited arguments: what the operator previewed is what is confirmed."""
    text = json.dumps([args, kwargs], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _parse_json(text: str, kind: type, label: str) -> Any:
    try:
        value = json.loads(text or ("[]" if kind is list else "{}"))
    except ValueError as exc:
        raise ValueError(f"{label} is not valid JSON: {exc}") from exc
    except RecursionError:
        # json.loads recurses once per level: [[[[... 100,000 deep exhausts the stack.
        raise ValueError(f"{label} is nested too deeply") from None
    if not isinstance(value, kind):
        raise ValueError(f"{label} must be a JSON {'list' if kind is list else 'object'}")
    return value


@admin.register(DeadLetter)
class DeadLetterAdmin(ReadOnlyAdmin):
    """Dead letters as the workers wrote them: read-only, with gated replay and discard."""

    list_display = (
        "id",
        "short_task_name",
        "reason",
        "short_exception",
        "attempts",
        "queue",
        "tenant",
        "failed_at",
        "status",
    )
    list_display_links = ("id", "short_task_name")
    list_filter = (
        "status",
        "reason",
        ("task_name", IndexedValuesFilter),
        ("exception_class", IndexedValuesFilter),
        ("queue", IndexedValuesFilter),
    )
    date_hierarchy = "failed_at"
    # Searched by exact match in get_search_results (indexed), never icontains.
    search_fields = ("=task_id", "=idempotency_key")
    search_help_text = "Exact task id, idempotency key or dead letter id."
    ordering = ("-failed_at", "-id")
    paginator = EstimatedCountPaginator
    show_full_result_count = False
    show_facets = admin.ShowFacets.NEVER
    list_per_page = 50
    actions = ["replay_selected", "discard_selected"]
    change_form_template = "admin/celery_guard/deadletter/change_form.html"
    fieldsets = (
        (
            None,
            {
                "fields": (
                    "task_name",
                    "task_id",
                    "status",
                    "status_reason",
                    "reason",
                    "exception_class",
                    "message_display",
                    "attempts",
                    "queue",
                    "tenant",
                    "idempotency_key",
                    "first_enqueued_at",
                    "failed_at",
                    "hostname",
                    "guarded",
                    "replay_of_link",
                    "sentry_link",
                )
            },
        ),
        ("Arguments", {"fields": ("arguments",)}),
        ("Traceback", {"fields": ("traceback_display",)}),
        ("Attempt history", {"fields": ("attempt_history",)}),
        ("Replay history", {"fields": ("replay_history",)}),
    )

    def lookup_allowed(self, lookup: str, value: str, request: Any = None) -> bool:
        """Only the changelist's own filters and date hierarchy may filter by URL.

        Django accepts a lookup on any field of the model by default: ``?kwargs__password
        __startswith=a`` would let a user who sees masked values guess them one character at
        a time, and ``?traceback__icontains=`` scans the whole table.
        """
        return lookup in _filter_lookups(self.list_filter, self.date_hierarchy)

    def has_replay_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        """Replay: ``celery_guard.replay_deadletter``."""
        return bool(request.user.has_perm(REPLAY_PERMISSION))

    def has_edit_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        """Revealing masked values: ``celery_guard.edit_deadletter``."""
        return bool(request.user.has_perm(EDIT_PERMISSION))

    def has_edit_replay_permission(self, request: HttpRequest) -> bool:
        """Edit-and-replay: ``edit_deadletter`` to edit, and ``replay_deadletter`` to replay."""
        return self.has_edit_permission(request) and self.has_replay_permission(request)

    def has_discard_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        """Discard: ``celery_guard.discard_deadletter``."""
        return bool(request.user.has_perm(DISCARD_PERMISSION))

    def get_queryset(self, request: HttpRequest) -> QuerySet[Any]:
        """Rows whose date hierarchy probes periods instead of scanning (see dlq_scale)."""
        queryset = super().get_queryset(request)
        queryset.__class__ = ProbedDatesQuerySet
        return queryset

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> list[str]:
        """Everything on the detail page is read-only."""
        return [str(name) for _, opts in self.fieldsets for name in opts["fields"]]

    # -- changelist --------------------------------------------------------------------------

    @admin.display(description="task", ordering="task_name")
    def short_task_name(self, obj: DeadLetter) -> str:
        """The task's function name without its module."""
        return obj.task_name.rsplit(".", 1)[-1]

    @admin.display(description="exception", ordering="exception_class")
    def short_exception(self, obj: DeadLetter) -> str:
        """The exception class without its module."""
        return obj.exception_class.rsplit(".", 1)[-1]

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[Any], search_term: str
    ) -> tuple[QuerySet[Any], bool]:
        """Exact, indexed matches on task id, idempotency key or id (never ``LIKE``)."""
        term = search_term.strip()
        if not term:
            return queryset, False
        condition = Q(task_id=term) | Q(idempotency_key=term)
        # isdigit() alone is true for "²", which int() refuses; the length keeps it an id.
        if term.isascii() and term.isdigit() and len(term) <= MAX_ID_DIGITS:
            condition |= Q(pk=int(term))
        return queryset.filter(condition), False

    def changelist_view(self, request: HttpRequest, extra_context: Any = None) -> HttpResponse:
        """Refuse (403) a POST naming a gated action the user may not run; 400 bad queries."""
        _check_query(request, self.date_hierarchy)
        # Every value: Django runs the one at the POST's "index", not necessarily the last.
        named = request.POST.getlist("action") if request.method == "POST" else []
        if any(
            action in GATED_ACTIONS and not request.user.has_perm(GATED_ACTIONS[action])
            for action in named
        ):
            raise PermissionDenied
        return super().changelist_view(request, extra_context)

    # -- detail ------------------------------------------------------------------------------

    def _reveal(self, request: HttpRequest) -> bool:
        return request.GET.get("reveal") == "1" and self.has_edit_permission(request)

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        """The read-only detail page, with the tool buttons the user may use."""
        revealing = self._reveal(request)
        context = {
            **(extra_context or {}),
            "can_replay": self.has_replay_permission(request),
            "can_edit": self.has_edit_permission(request),
            "can_edit_replay": self.has_edit_replay_permission(request),
            "can_discard": self.has_discard_permission(request),
            "revealing": revealing,
        }
        token = _revealing.set(revealing)
        try:
            response = super().change_view(request, object_id, form_url, context)
            # Render now, while the context variable holds this request's decision.
            if isinstance(response, TemplateResponse):
                response.render()
            return response
        finally:
            _revealing.reset(token)

    @admin.display(description="arguments")
    def arguments(self, obj: DeadLetter) -> SafeString:
        """Pretty-printed args and kwargs, sensitive values masked unless revealed."""
        if _revealing.get():
            data: Any = {"args": obj.args, "kwargs": obj.kwargs}
        else:
            data = redaction.redact(obj.args, obj.kwargs, task_name=obj.task_name)
        return format_html('<pre class="cg-arguments">{}</pre>', _pretty(data))

    @staticmethod
    def _hidden(obj: DeadLetter) -> frozenset[str]:
        # Rows are masked when written; masked again here for rows written before that, and
        # for a redaction configured since.
        if _revealing.get():
            return frozenset()
        return redaction.secrets(obj.args, obj.kwargs, task_name=obj.task_name)

    @admin.display(description="message")
    def message_display(self, obj: DeadLetter) -> str:
        """The exception message, argument values masked unless revealed."""
        return redaction.mask_text(obj.message, self._hidden(obj))

    @admin.display(description="traceback")
    def traceback_display(self, obj: DeadLetter) -> SafeString:
        """The traceback, preformatted, argument values masked unless revealed."""
        text = redaction.mask_text(obj.traceback, self._hidden(obj))
        return format_html('<pre class="cg-traceback">{}</pre>', text or "-")

    @admin.display(description="attempts")
    def attempt_history(self, obj: DeadLetter) -> SafeString:
        """One line per failed attempt: number, error, kind, delay, message (masked)."""
        history = records.masked_history(obj.history, self._hidden(obj))
        entries = [entry for entry in history if isinstance(entry, dict)]
        keys = ("attempt", "error", "kind", "delay", "message")
        return _table(
            ("attempt", "error", "kind", "delay (s)", "message"),
            [tuple(entry.get(key, "") for key in keys) for entry in entries],
        )

    @admin.display(description="replays")
    def replay_history(self, obj: DeadLetter) -> SafeString:
        """Each replay: task id, who, when, outcome (its new dead letter linked), finish."""
        replays = list(obj.replays.all())
        again = {
            row.task_id: row.pk
            for row in DeadLetter.objects.filter(replay_of=obj.pk).only("pk", "task_id")
        }
        lines = []
        for record in replays:
            # Linked whatever the recorded outcome: recording it is best effort (it never
            # fails the task), the dead letter is not.
            if record.task_id in again:
                url = reverse("admin:celery_guard_deadletter_change", args=[again[record.task_id]])
                outcome = format_html(
                    '<a href="{}">failed again: dead letter #{}</a>', url, again[record.task_id]
                )
            else:
                outcome = format_html("{}", record.get_outcome_display())
            lines.append(
                (
                    record.task_id,
                    record.replayed_by or "-",
                    record.replayed_at,
                    "yes" if record.edited else "no",
                    outcome,
                    record.finished_at or "-",
                )
            )
        return _table(("task id", "by", "at", "edited", "outcome", "finished"), lines)

    @admin.display(description="replay of")
    def replay_of_link(self, obj: DeadLetter) -> SafeString:
        """Link to the dead letter this failure replayed."""
        if obj.replay_of is None:
            return format_html("{}", "-")
        url = reverse("admin:celery_guard_deadletter_change", args=[obj.replay_of])
        return format_html('<a href="{}">dead letter #{}</a>', url, obj.replay_of)

    @admin.display(description="Sentry")
    def sentry_link(self, obj: DeadLetter) -> SafeString:
        """Link to the Sentry event (``CELERY_GUARD_SENTRY_EVENT_URL``)."""
        if not obj.sentry_event_id:
            return format_html("{}", "-")
        template = guard_settings.sentry_event_url
        if not template:
            return format_html("{}", obj.sentry_event_id)
        # replace, not format: other braces in the URL are not ours to interpret.
        url = template.replace("{event_id}", quote(obj.sentry_event_id, safe=""))
        return format_html('<a href="{}" rel="noopener">{}</a>', url, obj.sentry_event_id)

    # -- tools -------------------------------------------------------------------------------

    def get_urls(self) -> list[Any]:
        """The detail-page tool views, before the model admin's own URLs."""
        view = self.admin_site.admin_view
        return [
            path(
                "<path:object_id>/replay/",
                view(require_POST(self.replay_view)),
                name="celery_guard_deadletter_replay",
            ),
            path(
                "<path:object_id>/edit-replay/",
                view(self.edit_replay_view),
                name="celery_guard_deadletter_edit_replay",
            ),
            path(
                "<path:object_id>/discard/",
                view(self.discard_view),
                name="celery_guard_deadletter_discard",
            ),
            *super().get_urls(),
        ]

    def _get_row(self, request: HttpRequest, object_id: str) -> DeadLetter:
        """The dead letter of a tool URL, or 404 (also for an id that is not a number)."""
        row: DeadLetter | None = self.get_object(request, unquote(object_id))
        if row is None:
            raise Http404(f"no dead letter {object_id!r}")
        return row

    def _replay_rows(self, request: HttpRequest, ids: list[int]) -> replay.Summary:
        summary = replay.Summary()
        app = current_app._get_current_object()
        try:
            replay.replay(ids, app=app, user=request.user, summary=summary)
        except Exception as exc:
            self.message_user(
                request,
                f"Publishing a replay failed ({exc}); the dead letters not published yet stay "
                "as they were.",
                messages.ERROR,
            )
        level = messages.SUCCESS if not summary.unroutable else messages.WARNING
        self.message_user(request, _summary_message(summary), level)
        return summary

    @admin.action(description="Replay selected dead letters", permissions=["replay"])
    def replay_selected(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        """Publish each selected dead letter again (each at most once)."""
        # Ids only: the service loads each batch itself ("select all" may be a million rows).
        self._replay_rows(request, list(queryset.values_list("pk", flat=True)))

    def replay_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        """POST: replay one dead letter (the detail page's button)."""
        if not self.has_replay_permission(request):
            raise PermissionDenied
        row = self._get_row(request, object_id)
        self._replay_rows(request, [row.pk])
        return HttpResponseRedirect(reverse("admin:celery_guard_deadletter_change", args=[row.pk]))

    def edit_replay_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        """Edit the arguments as JSON, preview the diff, confirm: replay with them."""
        if not self.has_edit_replay_permission(request):
            raise PermissionDenied
        row = self._get_row(request, object_id)
        args_text = request.POST.get("args", _pretty(row.args))
        kwargs_text = request.POST.get("kwargs", _pretty(row.kwargs))
        error = diff = digest = ""
        if request.method == "POST":
            try:
                args = _parse_json(args_text, list, "args")
                kwargs = _parse_json(kwargs_text, dict, "kwargs")
                # What enqueue refuses (NaN, too deep, too large) is refused here too, before
                # the preview renders it or the confirm publishes it; and NUL, which the
                # replay record (jsonb) could not store.
                payload.check(
                    args, kwargs, max_bytes=guard_settings.max_payload_bytes, refuse_nul=True
                )
                reason = replay.unroutable_reason(
                    row, current_app._get_current_object(), args, kwargs
                )
                if reason:
                    raise ValueError(reason)
            except ValueError as exc:
                error = str(exc)
            else:
                diff = _diff(row, args, kwargs, masked=False)
                digest = _digest(args, kwargs)
                if "confirm" in request.POST:
                    # Only what was previewed is confirmed: arguments changed (or never
                    # previewed) go back to the preview instead of being published.
                    if request.POST.get("previewed") == digest:
                        return self._confirm_edit(request, row, args, kwargs)
                    error = "The arguments differ from the preview: check the changes again."
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "original": row,
            "title": f"Edit and replay dead letter #{row.pk}",
            "args_text": args_text,
            "kwargs_text": kwargs_text,
            "error": error,
            "diff": diff,
            "digest": digest,
            "previewed": bool(digest),
        }
        return TemplateResponse(request, "admin/celery_guard/deadletter/edit_replay.html", context)

    def _confirm_edit(
        self, request: HttpRequest, row: DeadLetter, args: Any, kwargs: Any
    ) -> HttpResponse:
        summary = replay.Summary()
        replay.replay_one(
            row,
            app=current_app._get_current_object(),
            user=request.user,
            change=_diff(row, args, kwargs, masked=True) or "(no change)",
            args=args,
            kwargs=kwargs,
            summary=summary,
        )
        level = messages.SUCCESS if row.pk in summary.task_ids else messages.WARNING
        self.message_user(request, _summary_message(summary), level)
        return HttpResponseRedirect(reverse("admin:celery_guard_deadletter_change", args=[row.pk]))

    def _discard_page(
        self, request: HttpRequest, queryset: QuerySet[Any], error: str = ""
    ) -> TemplateResponse:
        # "Select all N" posts select_across and the changelist's filters (in the URL), not
        # N ids: the page carries the same, whatever N is.
        select_across = request.POST.get("select_across") == "1"
        shown = list(queryset[: SHOWN_ROWS + 1])
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": "Discard dead letters",
            "rows": shown[:SHOWN_ROWS],
            "more": len(shown) > SHOWN_ROWS,
            "select_across": select_across,
            # Without select_across the queryset is the ticked rows: one page at most.
            "ids": []
            if select_across
            else [str(pk) for pk in queryset.values_list("pk", flat=True)],
            "error": error,
            "action_checkbox_name": ACTION_CHECKBOX_NAME,
        }
        return TemplateResponse(request, "admin/celery_guard/deadletter/discard.html", context)

    def _discard_flow(
        self, request: HttpRequest, queryset: QuerySet[Any], confirmed: bool
    ) -> TemplateResponse | None:
        """The reason page until a reason is confirmed; then discard (None)."""
        if not confirmed:
            return self._discard_page(request, queryset)
        try:
            done = services.discard(
                queryset, request.POST.get("discard_reason", ""), user=request.user
            )
        except ValueError:
            return self._discard_page(request, queryset, "A reason is required.")
        self.message_user(request, f"{done} dead letter(s) discarded.", messages.SUCCESS)
        return None

    @admin.action(description="Discard selected dead letters", permissions=["discard"])
    def discard_selected(
        self, request: HttpRequest, queryset: QuerySet[Any]
    ) -> TemplateResponse | None:
        """Ask for a reason (intermediate page), then discard the selected rows."""
        return self._discard_flow(request, queryset, "confirm" in request.POST)

    def discard_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        """Discard one dead letter with a reason (the detail page's button)."""
        if not self.has_discard_permission(request):
            raise PermissionDenied
        queryset = DeadLetter.objects.filter(pk=self._get_row(request, object_id).pk)
        page = self._discard_flow(request, queryset, request.method == "POST")
        if page is not None:
            return page
        return HttpResponseRedirect(
            reverse("admin:celery_guard_deadletter_change", args=[object_id])
        )


def _check_query(request: HttpRequest, date_hierarchy: str | None) -> None:
    """Refuse (400) changelist parameters that would fail in the database, not match nothing.

    PostgreSQL refuses NUL in any text parameter (a 500 otherwise), and Django turns a date
    hierarchy part into a ``datetime`` whose year overflows past 9999.

    Raises:
        BadRequest: A parameter holds a NUL character, or a date part is not a small number.
    """
    parts = {f"{date_hierarchy}__{part}" for part in ("year", "month", "day")}
    for name, values in request.GET.lists():
        if "\x00" in name or any("\x00" in value for value in values):
            raise BadRequest(f"parameter {name!r} contains a NUL character")
        if name in parts and not all(
            value.isascii() and value.isdigit() and len(value) <= 4 for value in values
        ):
            raise BadRequest(f"parameter {name!r} must be a number")


def _table(titles: tuple[str, ...], rows: list[tuple[Any, ...]]) -> SafeString:
    """An HTML table (values escaped), or "-" when there are no rows."""
    if not rows:
        return format_html("{}", "-")
    cells = "".join("<td>{}</td>" for _ in titles)
    return format_html(
        "<table><tr>{}</tr>{}</table>",
        format_html_join("", "<th>{}</th>", ((title,) for title in titles)),
        format_html_join("", f"<tr>{cells}</tr>", rows),
    )


def _diff(row: DeadLetter, args: Any, kwargs: Any, *, masked: bool) -> str:
    """Unified diff of the stored arguments against the edited ones (masked for the log)."""
    if masked:
        before = redaction.redact(row.args, row.kwargs, task_name=row.task_name)
        after = redaction.redact(args, kwargs, task_name=row.task_name)
    else:
        before = {"args": row.args, "kwargs": row.kwargs}
        after = {"args": args, "kwargs": kwargs}
    lines = difflib.unified_diff(
        _pretty(before).splitlines(),
        _pretty(after).splitlines(),
        "stored",
        "edited",
        lineterm="",
    )
    return "\n".join(lines)
