"""Claiming slots: fencing, the forward-only last run, unique fire rows, overlap policy."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta, timezone

import pytest
from django.utils import timezone as dj_timezone
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from celery_guard.beat import fires, lease, slots
from celery_guard.core import headers
from celery_guard.models import BeatFire, OutboxMessage

pytestmark = pytest.mark.django_db(transaction=True)

UTC = timezone.utc
T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def entry():
    interval = IntervalSchedule.objects.create(every=10, period=IntervalSchedule.SECONDS)
    return PeriodicTask.objects.create(
        name="report", task="tests.testapp.tasks.beat_job", interval=interval, last_run_at=T0
    )


@pytest.fixture
def token():
    return lease.acquire_or_renew("lock", "me", 30).token


def claim_for(entry, token, slot, *, missed=(), fire=True, policy=None, holder="me"):
    plan = slots.Plan(slot, fire, tuple(missed), len(missed), slot + timedelta(seconds=10))
    return fires.Claim(
        lock_name="lock",
        holder=holder,
        token=token,
        ttl=30,
        entry=entry.name,
        periodic_task_id=entry.pk,
        task=entry.task,
        task_id=f"id-{slot:%H%M%S}",
        plan=plan,
        policy=policy or slots.EntryPolicy(),
    )


def at(seconds):
    return T0 + timedelta(seconds=seconds)


def test_a_slot_fires_once_and_moves_the_last_run_forward(entry, token):
    assert fires.claim(claim_for(entry, token, at(10))) is fires.Outcome.FIRED
    entry.refresh_from_db()
    assert entry.last_run_at == at(10) and entry.total_run_count == 1
    row = BeatFire.objects.get()
    assert (row.status, row.token, row.task_id, row.holder) == ("fired", token, "id-120010", "me")

    # The same slot again (a second beat, or a frozen ex-leader): nothing.
    assert fires.claim(claim_for(entry, token, at(10))) is fires.Outcome.STALE
    # An older slot than the last run (a stale in-memory schedule): nothing either.
    PeriodicTask.objects.filter(pk=entry.pk).update(last_run_at=at(30))
    assert fires.claim(claim_for(entry, token, at(20))) is fires.Outcome.STALE
    assert fires.claim(claim_for(entry, token, at(30))) is fires.Outcome.STALE
    assert BeatFire.objects.count() == 1


def test_the_unique_row_refuses_a_slot_even_if_last_run_was_moved_back(entry, token):
    assert fires.claim(claim_for(entry, token, at(10))) is fires.Outcome.FIRED
    PeriodicTask.objects.filter(pk=entry.pk).update(last_run_at=T0)  # e.g. edited by hand
    assert fires.claim(claim_for(entry, token, at(10))) is fires.Outcome.TAKEN
    entry.refresh_from_db()
    assert entry.last_run_at == T0  # the refused claim rolled back entirely


def test_a_term_that_is_over_cannot_claim(entry, token):
    BeatFire.objects.all().delete()
    assert fires.claim(claim_for(entry, token + 1, at(10))) is fires.Outcome.LOST
    assert fires.claim(claim_for(entry, token, at(10), holder="other")) is fires.Outcome.LOST
    assert not BeatFire.objects.exists()
    entry.refresh_from_db()
    assert entry.last_run_at == T0


def test_catchup_records_missed_slots_and_a_late_slot_under_skip(entry, token):
    missed = [at(10), at(20)]
    assert fires.claim(claim_for(entry, token, at(30), missed=missed)) is fires.Outcome.FIRED
    assert list(BeatFire.objects.order_by("slot").values_list("status", flat=True)) == [
        "missed",
        "missed",
        "fired",
    ]
    assert "2 older slot(s) missed" in BeatFire.objects.get(slot=at(30)).detail
    assert fires.claim(claim_for(entry, token, at(40), fire=False)) is fires.Outcome.MISSED
    entry.refresh_from_db()
    assert entry.last_run_at == at(40) and entry.total_run_count == 1


def test_overlap_skip_waits_for_the_previous_run_to_finish(entry, token):
    skip = slots.EntryPolicy(overlap="skip", overlap_timeout=60)
    assert fires.claim(claim_for(entry, token, at(10), policy=skip)) is fires.Outcome.FIRED
    beat = headers.read(fires.message_headers(entry.name, at(10), token))[headers.BEAT]
    assert beat["key"] == "beat:report:2026-01-01T12:00:10Z"
    fires.record_start(beat)
    assert BeatFire.objects.get(slot=at(10)).started_at is not None

    assert fires.claim(claim_for(entry, token, at(20), policy=skip)) is fires.Outcome.SKIPPED
    fires.record_finish(beat, "RETRY")  # not final: still running
    assert fires.claim(claim_for(entry, token, at(30), policy=skip)) is fires.Outcome.SKIPPED
    fires.record_finish(beat, "SUCCESS")
    assert fires.claim(claim_for(entry, token, at(40), policy=skip)) is fires.Outcome.FIRED

    # A run that never reports back (its worker died) stops blocking after the timeout.
    BeatFire.objects.filter(slot=at(40)).update(fired_at=dj_timezone.now() - timedelta(seconds=61))
    assert fires.claim(claim_for(entry, token, at(50), policy=skip)) is fires.Outcome.FIRED
    assert fires.claim(claim_for(entry, token, at(60))) is fires.Outcome.FIRED  # overlap=allow
    statuses = dict(BeatFire.objects.values_list("slot", "status"))
    assert statuses[at(20)] == statuses[at(30)] == "skipped"


def test_a_fired_claim_writes_its_message_as_an_outbox_row_in_the_same_transaction(entry, token):
    message = fires.Message(
        args=[1],
        kwargs={"b": 2},
        options={"queue": "q"},
        headers=fires.message_headers(entry.name, at(10), token),
        guard={},
        prepared=True,
    )
    claim = dataclasses.replace(claim_for(entry, token, at(10)), message=message)
    outcome, row = fires.claim_and_write(claim)
    assert outcome is fires.Outcome.FIRED
    stored = OutboxMessage.objects.get()
    assert stored.pk == row.pk and stored.state == "pending"
    assert (stored.task_name, stored.task_id, stored.args, stored.kwargs, stored.queue) == (
        "tests.testapp.tasks.beat_job",
        "id-120010",
        [1],
        {"b": 2},
        "q",
    )
    assert stored.headers[headers.HEADER]["beat"]["key"] == "beat:report:2026-01-01T12:00:10Z"
    # A claim that publishes nothing writes no row; one refused rolls its row back.
    assert fires.claim_and_write(claim) == (fires.Outcome.STALE, None)
    skipped = dataclasses.replace(claim_for(entry, token, at(20), fire=False), message=message)
    assert fires.claim_and_write(skipped) == (fires.Outcome.MISSED, None)
    assert OutboxMessage.objects.count() == 1


def test_headers_without_a_slot_are_ignored_by_the_worker_side(entry, token):
    fires.claim(claim_for(entry, token, at(10)))
    fires.record_start({})
    fires.record_start({"entry": "report", "slot": "yesterday"})
    fires.record_finish(None, "SUCCESS")
    assert BeatFire.objects.get().started_at is None
