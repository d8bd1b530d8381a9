"""Delivery services on the real database and broker: claims, relay --once, purge."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.db import transaction
from django.utils import timezone

from celery_guard.delivery import services
from celery_guard.models import OutboxMessage
from tests.support.harness import queue_length
from tests.testapp.outbox_tasks import outbox_job

pytestmark = [pytest.mark.django_db(transaction=True)]


def make_rows(count: int, **fields) -> list[OutboxMessage]:
    now = timezone.now()
    rows = []
    for i in range(count):
        task_id = str(uuid.uuid4())
        values = {
            "task_name": outbox_job.name,
            "task_id": task_id,
            "args": [f"row-{i}"],
            "guard": {"idempotency_key": f"outbox:{task_id}"},
            "created_at": now,
            "due_at": now,
            **fields,
        }
        rows.append(OutboxMessage(**values))
    return OutboxMessage.objects.bulk_create(rows)


def test_claims_never_overlap_and_skip_rows_not_due():
    make_rows(5)
    make_rows(2, due_at=timezone.now() + timedelta(hours=1))
    _, first = services.claim_due(3, lease=30)
    _, second = services.claim_due(10, lease=30)
    assert len(first) == 3 and len(second) == 2
    assert not {r.pk for r in first} & {r.pk for r in second}
    assert services.claim_due(10, lease=30)[1] == []


def test_relay_once_publishes_pending_rows(redis_url, queues, empty_queues, capsys):
    make_rows(3)
    call_command("celery_guard", "relay", "--once")
    assert "published 3 message(s)" in capsys.readouterr().out
    assert not OutboxMessage.objects.filter(state="pending").exists()
    assert queue_length(redis_url, queues["default"]) == 3


def test_without_the_fast_path_a_commit_writes_a_row_due_now_and_publishes_nothing(
    redis_url, queues, empty_queues, settings
):
    settings.CELERY_GUARD_OUTBOX_FAST_PATH = False
    with transaction.atomic():
        outbox_job.delay_on_commit("relay-only")
    row = OutboxMessage.objects.get()
    assert row.state == "pending" and row.due_at <= timezone.now()
    assert queue_length(redis_url, queues["default"]) == 0
    _, rows = services.claim_due(10, lease=30)
    assert services.publish_claimed(outbox_job.app, rows) == 1
    assert queue_length(redis_url, queues["default"]) == 1


def test_purge_deletes_old_dispatched_rows_only(settings, capsys):
    settings.CELERY_GUARD_OUTBOX_RETENTION = 3600
    old = timezone.now() - timedelta(hours=2)
    make_rows(2, state="dispatched", dispatched_at=old)
    make_rows(1, state="dispatched", dispatched_at=timezone.now())
    make_rows(1)
    call_command("celery_guard", "purge")
    assert "purged 2 dispatched outbox row(s)" in capsys.readouterr().out
    assert OutboxMessage.objects.count() == 2


def test_a_row_its_task_refuses_does_not_hold_up_the_rows_behind_it(
    redis_url, queues, empty_queues
):
    now = timezone.now()
    [bad] = make_rows(1, guard={"no_such_option": 1}, due_at=now - timedelta(seconds=1))
    make_rows(2, due_at=now)
    _, rows = services.claim_due(10, lease=30)
    assert rows[0].pk == bad.pk
    assert services.publish_claimed(outbox_job.app, rows) == 2
    bad.refresh_from_db()
    assert bad.state == "pending" and bad.publish_attempts == 1
    assert "no_such_option" in bad.last_error
    assert queue_length(redis_url, queues["default"]) == 2
