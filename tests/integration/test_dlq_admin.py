"""The dead-letter admin through the Django test client (replays on a worker: acceptance)."""

import pytest
from django.contrib.admin.models import LogEntry
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from bench import seed as seeding
from celery_guard.dlq import admin, services
from celery_guard.models import DeadLetter, DeadLetterReplay
from tests.support.dlq import (
    CHANGELIST,
    action_names,
    change_url,
    dead_letter,
    messages_of,
    staff,
    tool_url,
)
from tests.support.harness import queue_length


@pytest.mark.django_db
def test_without_the_permission_replay_is_absent_and_refused(client, redis_url, queues):
    row = dead_letter("viewer")
    client.force_login(staff("viewer"))
    page = client.get(reverse(CHANGELIST))
    assert page.status_code == 200
    assert "replay_selected" not in action_names(page)
    assert "discard_selected" not in action_names(page)
    detail = client.get(change_url(row))
    assert detail.status_code == 200
    assert b"cg-replay" not in detail.content
    crafted = {"action": "replay_selected", "_selected_action": [row.pk]}
    assert client.post(reverse(CHANGELIST), crafted).status_code == 403
    hidden = {**crafted, "action": ["replay_selected", "delete_selected"], "index": "0"}
    assert client.post(reverse(CHANGELIST), hidden).status_code == 403
    assert client.post(tool_url("replay", row)).status_code == 403
    assert client.get(tool_url("edit_replay", row)).status_code == 403
    assert client.post(tool_url("edit_replay", row), {"confirm": "1"}).status_code == 403
    assert client.post(tool_url("discard", row), {"discard_reason": "x"}).status_code == 403
    row.refresh_from_db()
    assert row.status == DeadLetter.Status.DEAD
    assert queue_length(redis_url, queues["default"]) == 0
    # Read-only: no add, no change, no delete.
    assert client.get(reverse("admin:celery_guard_deadletter_add")).status_code == 403
    assert b'name="_save"' not in detail.content


@pytest.mark.django_db
def test_unroutable_rows_are_reported_and_nothing_is_published(client, redis_url, queues):
    gone = dead_letter("gone", task_name="tests.testapp.dlq_tasks.removed")
    stale = dead_letter("stale", kwargs={"removed_parameter": 1})
    client.force_login(staff("operator", "replay_deadletter"))
    action = {"action": "replay_selected", "_selected_action": [gone.pk, stale.pk]}
    response = client.post(reverse(CHANGELIST), action, follow=True)
    text = messages_of(response)
    assert "0 replayed, 0 skipped (not dead any more, or in another replay), 2 unroutable" in text
    assert "is not registered" in text and "removed_parameter" in text
    assert queue_length(redis_url, queues["default"]) == 0
    assert set(DeadLetter.objects.values_list("status", flat=True)) == {"unroutable"}
    assert not DeadLetterReplay.objects.exists()
    assert LogEntry.objects.filter(change_message__contains="unroutable").count() == 2


@pytest.mark.django_db
def test_sensitive_values_are_masked_and_revealed_only_with_the_edit_permission(client):
    row = dead_letter("secret", kwargs={"password": "hunter2", "user": "bob"})
    client.force_login(staff("operator", "replay_deadletter"))
    for url in (change_url(row), change_url(row) + "?reveal=1"):
        page = client.get(url).content
        assert b"hunter2" not in page and b"********" in page and b"bob" in page
    client.force_login(staff("editor", "edit_deadletter"))
    assert b"hunter2" not in client.get(change_url(row)).content
    assert b"hunter2" in client.get(change_url(row) + "?reveal=1").content


@pytest.mark.django_db
def test_discard_needs_a_reason_and_is_audited(client):
    row = dead_letter("discard-me")
    client.force_login(staff("operator", "discard_deadletter"))
    action = {"action": "discard_selected", "_selected_action": [row.pk]}
    page = client.post(reverse(CHANGELIST), action)
    assert page.status_code == 200 and b"discard_reason" in page.content
    empty = client.post(reverse(CHANGELIST), {**action, "confirm": "1", "discard_reason": " "})
    assert b"A reason is required" in empty.content
    row.refresh_from_db()
    assert row.status == DeadLetter.Status.DEAD
    reason = {**action, "confirm": "1", "discard_reason": "customer deleted"}
    done = client.post(reverse(CHANGELIST), reason, follow=True)
    assert "1 dead letter(s) discarded" in messages_of(done)
    row.refresh_from_db()
    assert (row.status, row.status_reason) == ("discarded", "customer deleted")
    entry = LogEntry.objects.get(object_id=str(row.pk))
    assert "Discarded (was dead): customer deleted" in entry.get_change_message()


@pytest.mark.django_db
def test_search_is_exact_on_task_id_key_and_id(client):
    target = dead_letter("find", idempotency_key="order:42")
    dead_letter("other", idempotency_key="order:421")
    client.force_login(staff("viewer"))

    def found(term):
        page = client.get(reverse(CHANGELIST), {"q": term})
        return [r.pk for r in page.context["cl"].result_list]

    assert found(target.task_id) == [target.pk]
    assert found("order:42") == [target.pk]
    assert found(str(target.pk)) == [target.pk]
    assert found(target.task_id[:8]) == []  # no substring match


@pytest.mark.django_db
def test_filters_and_query_count_independent_of_page_size(client, monkeypatch):
    seeding.seed(60, batch=30)
    client.force_login(staff("viewer"))
    page = client.get(reverse(CHANGELIST), {"status__exact": "dead"})
    shown = page.context["cl"].result_list
    assert shown and all(r.status == "dead" for r in shown)
    some_task = shown[0].task_name
    filtered = client.get(reverse(CHANGELIST), {"task_name": some_task})
    assert all(r.task_name == some_task for r in filtered.context["cl"].result_list)
    assert some_task.encode() in filtered.content  # listed as a filter choice
    counts = []
    for per_page in (5, 50):
        monkeypatch.setattr(admin.DeadLetterAdmin, "list_per_page", per_page)
        with CaptureQueriesContext(connection) as queries:
            page = client.get(reverse(CHANGELIST), {"reason__exact": "permanent"})
        assert len(page.context["cl"].result_list) == min(
            per_page, DeadLetter.objects.filter(reason="permanent").count()
        )
        counts.append(len(queries))
    assert counts[0] == counts[1]
    assert not any("COUNT(*)" in q["sql"] and "LIMIT" not in q["sql"] for q in queries)


@pytest.mark.django_db
def test_detail_links_sentry_and_the_replayed_dead_letter(client, settings):
    original = dead_letter("first")
    row = dead_letter("again", sentry_event_id="abc123", replay_of=original.pk)
    client.force_login(staff("viewer"))
    page = client.get(change_url(row)).content.decode()
    assert "abc123" in page and "https://sentry" not in page
    assert f'href="{change_url(original)}"' in page
    settings.CELERY_GUARD_SENTRY_EVENT_URL = "https://sentry.example/issues/?query={event_id}"
    page = client.get(change_url(row)).content.decode()
    assert 'href="https://sentry.example/issues/?query=abc123"' in page


@pytest.mark.django_db
def test_only_the_changelist_filters_may_filter_by_url(client):
    dead_letter("probe", kwargs={"api_key": "sk-live-1"})
    client.force_login(staff("viewer"))
    # A lookup on stored arguments would let a viewer guess a masked value letter by letter.
    for crafted in (
        {"kwargs__api_key__startswith": "sk"},
        {"args__0": "probe"},
        {"traceback__icontains": "Error"},
    ):
        assert client.get(reverse(CHANGELIST), crafted).status_code == 400, crafted
    for allowed in (
        {"status__exact": "dead"},
        {"queue": "x"},
        {"reason__exact": "permanent"},
        {"failed_at__year": "2026"},
    ):
        assert client.get(reverse(CHANGELIST), allowed).status_code == 200, allowed


@pytest.mark.django_db
def test_arguments_stored_as_repr_are_masked_whole(client):
    # A payload that was not JSON (an unguarded pickle task) is stored as its repr string.
    row = dead_letter("repr", args="('x',)", kwargs="{'password': 'hunter2'}")
    client.force_login(staff("viewer"))
    page = client.get(change_url(row)).content
    assert b"hunter2" not in page and b"********" in page


@pytest.mark.django_db
def test_tool_urls_of_unknown_rows_are_404(client):
    client.force_login(
        staff("operator", "replay_deadletter", "edit_deadletter", "discard_deadletter")
    )
    for name in ("replay", "edit_replay", "discard"):
        for bad in ("999999", "not-a-number"):
            url = reverse(f"admin:celery_guard_deadletter_{name}", args=[bad])
            assert client.post(url).status_code == 404, (name, bad)


@pytest.mark.django_db
def test_discarding_all_that_a_filter_selects_carries_the_filter_not_the_ids(client, monkeypatch):
    monkeypatch.setattr(services, "DISCARD_BATCH", 7)  # several batches
    doomed = [dead_letter(f"d{n}", queue="doomed") for n in range(20)]
    kept = dead_letter("kept")
    client.force_login(staff("operator", "discard_deadletter"))
    url = reverse(CHANGELIST) + "?queue=doomed"
    action = {"action": "discard_selected", "select_across": "1", "index": "0"}
    action["_selected_action"] = [doomed[0].pk]  # the ticked row; select_across takes all
    page = client.post(url, action)
    assert page.status_code == 200 and b'name="select_across" value="1"' in page.content
    assert page.content.count(b'name="_selected_action"') == 0
    done = client.post(url, {**action, "confirm": "1", "discard_reason": "bad batch"}, follow=True)
    assert "20 dead letter(s) discarded" in messages_of(done)
    statuses = dict(DeadLetter.objects.values_list("pk", "status"))
    assert {statuses[row.pk] for row in doomed} == {"discarded"}
    assert statuses[kept.pk] == "dead"
    entries = LogEntry.objects.filter(change_message="Discarded (was dead): bad batch")
    assert entries.count() == 20 and {e.user.username for e in entries} == {"operator"}
