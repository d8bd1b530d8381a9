"""Replays from the dead-letter admin that run on a real worker."""

import time

import pytest
from django.contrib.admin.models import LogEntry
from django.db import connection
from django.urls import reverse

from celery_guard.dlq import replay as replay_service
from celery_guard.idempotency import keys, ledger
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
from tests.support.harness import queue_length, wait_until
from tests.testapp import idem_tasks
from tests.testapp.dlq_tasks import fix
from tests.testapp.models import Execution


@pytest.mark.django_db(transaction=True)
def test_replay_runs_on_a_real_worker_and_a_double_replay_publishes_once(
    client, start_worker, redis_url, queues
):
    row = dead_letter("admin-replay")
    client.force_login(staff("operator", "replay_deadletter"))
    page = client.get(reverse(CHANGELIST))
    assert "replay_selected" in action_names(page)
    fix("admin-replay")  # the cause is fixed; now replay
    action = {"action": "replay_selected", "_selected_action": [row.pk]}
    first = client.post(reverse(CHANGELIST), action, follow=True)
    assert (
        "1 replayed, 0 skipped (not dead any more, or in another replay), 0 unroutable"
        in messages_of(first)
    )
    # A double submit and the detail page's button: nothing more is published.
    again = client.post(reverse(CHANGELIST), action, follow=True)
    assert "0 replayed, 1 skipped" in messages_of(again)
    button = client.post(tool_url("replay", row), follow=True)
    assert "0 replayed, 1 skipped" in messages_of(button)
    assert queue_length(redis_url, queues["default"]) == 1
    start_worker(["default"])
    run = wait_until(lambda: Execution.objects.filter(label="admin-replay").first())
    time.sleep(0.5)
    assert Execution.objects.filter(label="admin-replay").count() == 1
    record = DeadLetterReplay.objects.get(dead_letter=row)
    assert record.replayed_by == "operator"
    assert run.guard_header["replay_of"] == row.pk
    assert run.guard_header["attempt"] == 1
    row.refresh_from_db()
    assert row.status == DeadLetter.Status.REPLAYED
    [entry] = LogEntry.objects.filter(object_id=str(row.pk))
    assert entry.user.username == "operator"
    assert record.task_id in entry.get_change_message()
    # The worker recorded how the replay ended, and the detail page shows it.
    record = wait_until(
        lambda: DeadLetterReplay.objects.filter(dead_letter=row, outcome="succeeded").first()
    )
    assert record.finished_at is not None
    detail = client.get(change_url(row)).content.decode()
    assert record.task_id in detail
    assert "<td>succeeded</td>" in detail
    assert "failed again" not in detail


@pytest.mark.django_db(transaction=True)
def test_a_replay_that_fails_again_links_to_its_new_dead_letter(client, start_worker):
    row = dead_letter("still-broken")
    client.force_login(staff("operator", "replay_deadletter"))
    client.post(tool_url("replay", row))
    start_worker(["default"])
    again = wait_until(lambda: DeadLetter.objects.filter(replay_of=row.pk).first())
    record = wait_until(
        lambda: DeadLetterReplay.objects.filter(dead_letter=row, outcome="failed").first()
    )
    assert again.task_id == record.task_id
    assert record.finished_at is not None
    detail = client.get(change_url(row)).content.decode()
    assert f"failed again: dead letter #{again.pk}" in detail
    assert change_url(again) in detail


@pytest.mark.django_db(transaction=True)
def test_a_replay_that_ends_before_its_claim_commits_still_records_its_outcome(
    client, start_worker, monkeypatch
):
    row = dead_letter("quick")
    fix("quick")
    client.force_login(staff("operator", "replay_deadletter"))
    start_worker(["default"])
    log_changes = replay_service.audit.log_changes
    ended_first = []

    def hold_the_claim_after_publishing(user, entries):
        entries = list(entries)
        # The replay's entry is logged after the batch's messages went out, in the claim's
        # transaction, which commits (with the replay record) only after this returns. On
        # PostgreSQL the worker runs the whole task meanwhile; on SQLite it waits for the
        # write lock.
        replayed = any(message.startswith("Replayed") for _, message in entries)
        if replayed and connection.vendor == "postgresql":
            ended_first.append(wait_until(lambda: Execution.objects.filter(label="quick").exists()))
            time.sleep(0.5)  # the end of the run (task_postrun) finds no committed record yet
        return log_changes(user, entries)

    monkeypatch.setattr(replay_service.audit, "log_changes", hold_the_claim_after_publishing)
    client.post(tool_url("replay", row))
    if connection.vendor == "postgresql":
        assert ended_first == [True]
    record = wait_until(
        lambda: DeadLetterReplay.objects.filter(dead_letter=row, outcome="succeeded").first(),
        timeout=15,
    )
    assert record.finished_at is not None


@pytest.mark.django_db(transaction=True)
def test_edit_and_replay_needs_its_permission_shows_a_diff_and_is_audited(
    client, start_worker, redis_url, queues
):
    row = dead_letter("typo", kwargs={"removed_parameter": 1, "token": "s3cret"})
    client.force_login(staff("operator", "replay_deadletter"))
    assert client.get(tool_url("edit_replay", row)).status_code == 403
    # Editing is not replaying: the edit permission alone cannot publish either.
    client.force_login(staff("edit-only", "edit_deadletter"))
    assert b"cg-edit-replay" not in client.get(change_url(row)).content
    assert client.post(tool_url("edit_replay", row), {"confirm": "1"}).status_code == 403
    client.force_login(staff("editor", "replay_deadletter", "edit_deadletter"))
    form = client.get(tool_url("edit_replay", row))
    assert form.status_code == 200 and b"removed_parameter" in form.content
    edited = {"args": '["fixed-label"]', "kwargs": '{"note": "s3cret"}'}
    bad = client.post(tool_url("edit_replay", row), {**edited, "args": '["a", "b", "c"]'})
    assert b"do not bind" in bad.content and b"cg-confirm" not in bad.content
    preview = client.post(tool_url("edit_replay", row), {**edited, "preview": "1"})
    diff = preview.context["diff"]
    assert '-    "removed_parameter": 1' in diff and '+    "note": "s3cret"' in diff
    assert b"cg-confirm" in preview.content
    assert queue_length(redis_url, queues["default"]) == 0  # a preview publishes nothing
    previewed = preview.context["digest"]
    # A confirm of arguments other than the previewed ones (or never previewed) publishes
    # nothing: it shows their diff for a new confirmation.
    changed = {"args": '["other"]', "kwargs": '{"note": "s3cret"}', "previewed": previewed}
    unseen = client.post(tool_url("edit_replay", row), {**changed, "confirm": "1"})
    assert b"differ from the preview" in unseen.content and b"cg-confirm" in unseen.content
    assert queue_length(redis_url, queues["default"]) == 0
    fix("fixed-label")
    confirm = {**edited, "confirm": "1", "previewed": previewed}
    done = client.post(tool_url("edit_replay", row), confirm, follow=True)
    assert "1 replayed" in messages_of(done)
    start_worker(["default"])
    wait_until(lambda: Execution.objects.filter(label="fixed-label").exists())
    record = DeadLetterReplay.objects.get(dead_letter=row)
    assert record.edited and record.kwargs == {"note": "s3cret"}
    row.refresh_from_db()
    assert row.kwargs == {"removed_parameter": 1, "token": "s3cret"}  # stored data untouched
    entry = LogEntry.objects.get(object_id=str(row.pk))
    message = entry.get_change_message()
    assert entry.user.username == "editor"
    assert "edited arguments" in message and "fixed-label" in message
    assert "s3cret" not in message.replace('"note": "s3cret"', "")  # the token stays masked


@pytest.mark.django_db(transaction=True)
def test_a_replay_runs_although_its_dead_task_still_holds_the_key(client, start_worker, queues):
    task = idem_tasks.idem_notify
    identity = keys.identify(task, [7, "v1"], {}, {})
    row = dead_letter(
        "held",
        task_name=task.name,
        queue=queues["high"],
        args=[7, "v1"],
        headers={"celery_guard": {"v": 1, "attempt": 1, "priority": "high"}},
        idempotency_key=identity.key,
    )
    # The dead run's worker died holding the key under an hour's lease.
    ledger.get_ledger().start(
        identity.key,
        task_name=task.name,
        task_id=row.task_id,
        fingerprint=identity.fingerprint,
        window=identity.window,
        owner="a-dead-worker",
        lease=3600,
    )
    client.force_login(staff("operator", "replay_deadletter"))
    client.post(tool_url("replay", row))
    start_worker(["high"])
    # Re-armed by the replay: the body runs now, not after the dead run's lease.
    run = wait_until(lambda: Execution.objects.filter(task=task.name).first(), timeout=30)
    assert run.guard_header["replay_of"] == row.pk
