"""The bulk-run admin: the card, CSV of failed items, gated and audited retry and cancel."""

import pytest
from django.contrib.admin.models import LogEntry
from django.urls import reverse

from celery_guard.models import BulkRun, BulkRunItem
from tests.support.runs import run_in_progress, run_staff

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("empty_queues")]


def card(run):
    return reverse("admin:celery_guard_bulkrun_change", args=[run.pk])


def test_the_card_shows_progress_counters_and_errors_by_class(client):
    run = run_in_progress()
    client.force_login(run_staff("viewer"))
    page = client.get(card(run)).content.decode()
    assert "90 / 120" in page and "75%" in page
    assert "celery_guard.exceptions.PermanentError" in page
    assert "requests.exceptions.HTTPError" in page
    assert "hr.manager" in page
    assert "Retry failed items" not in page and "Cancel" not in page  # no permission
    filtered = client.get(card(run), {"error_class": "requests.exceptions.HTTPError"})
    assert filtered.context["page"].paginator.count == 5
    changelist = client.get(reverse("admin:celery_guard_bulkrun_changelist"), {"status": "running"})
    assert [r.pk for r in changelist.context["cl"].result_list] == [run.pk]


def test_failed_items_export_as_csv(client):
    run = run_in_progress()
    client.force_login(run_staff("viewer"))
    response = client.get(reverse("admin:celery_guard_bulkrun_failed_csv", args=[run.pk]))
    lines = b"".join(response.streaming_content).decode().splitlines()
    assert lines[0] == "item,task_id,attempts,error_class,error_message,dead_letter"
    assert len(lines) == 1 + run.failed == 11
    assert lines[1].startswith("0,")


def test_retry_and_cancel_need_their_permissions_and_are_audited(client):
    run = run_in_progress()
    client.force_login(run_staff("viewer"))
    retry = reverse("admin:celery_guard_bulkrun_retry", args=[run.pk])
    cancel = reverse("admin:celery_guard_bulkrun_cancel", args=[run.pk])
    assert client.post(retry).status_code == 403
    assert client.post(cancel).status_code == 403
    changelist = reverse("admin:celery_guard_bulkrun_changelist")
    action = {"action": "cancel_selected", "_selected_action": [run.pk]}
    assert client.post(changelist, action).status_code == 403
    assert BulkRun.objects.count() == 1

    client.force_login(run_staff("operator", "retry_bulkrun", "cancel_bulkrun"))
    assert client.post(retry).status_code == 302
    child = BulkRun.objects.get(parent=run)
    failed = set(BulkRunItem.objects.filter(run=run, status="failed").values_list("seq", flat=True))
    assert {i.kwargs["n"] for i in BulkRunItem.objects.filter(run=child)} == failed
    assert child.initiator == "operator"
    assert client.post(cancel).status_code == 302
    run.refresh_from_db()
    assert (run.status, run.cancelled, run.cancelled_by) == ("cancelled", 30, "operator")
    messages = set(LogEntry.objects.filter(object_id=str(run.pk)).values_list("change_message"))
    assert messages == {
        (f"Retried {child.total} failed item(s) as run #{child.pk}.",),
        ("Cancelled: 30 pending item(s) cancelled.",),
    }
