"""``GuardedScheduler`` in this process against the real database and broker.

Two schedulers in one process stand for two beat hosts; their ticks are driven by the test,
so the frozen-leader case is exact: the old leader still believes it leads and has a due
entry in memory, and still publishes nothing.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import pytest
from celery import current_app
from django.conf import settings
from django.test import override_settings
from django.utils import timezone as dj_timezone
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from celery_guard import signals
from celery_guard.beat import GuardedScheduler
from celery_guard.core import headers as guard_headers
from celery_guard.models import BeatFire, BeatLease
from tests.support.harness import purge, queue_length, wait_until

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def beat_queue(redis_url):
    name = f"cgt-{settings.RUN_ID}-beat-unit"
    purge(redis_url, [name])
    yield name
    purge(redis_url, [name])


@pytest.fixture
def schedulers():
    made = []

    def make():
        scheduler = GuardedScheduler(app=current_app._get_current_object(), max_interval=1)
        made.append(scheduler)
        return scheduler

    yield make
    for scheduler in made:
        scheduler.close()


def every_second(queue, name="tick", every=1, task="tests.testapp.tasks.beat_job", **fields):
    interval, _ = IntervalSchedule.objects.get_or_create(
        every=every, period=IntervalSchedule.SECONDS
    )
    last = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(seconds=1)
    return PeriodicTask.objects.create(
        name=name,
        task=task,
        interval=interval,
        queue=queue,
        last_run_at=last,
        **fields,
    )


def fired_count():
    return BeatFire.objects.filter(status=BeatFire.Status.FIRED).count()


def tick_until_fired(scheduler, count, timeout=10):
    def fired_enough():
        scheduler.tick()
        return fired_count() >= count

    wait_until(fired_enough, timeout, interval=0.05)


def test_only_the_leader_publishes_and_a_frozen_ex_leader_publishes_nothing(
    schedulers, beat_queue, redis_url, caplog
):
    leaders = []
    signals.lease_acquired.connect(
        lambda sender, **kw: leaders.append(kw["token"]), weak=False, dispatch_uid="t-sched"
    )
    try:
        entry = every_second(beat_queue)
        a, b = schedulers(), schedulers()
        tick_until_fired(a, 1)
        for _ in range(3):
            assert b.tick() == 1.0  # standby: waits one loop interval, publishes nothing
        assert queue_length(redis_url, beat_queue) == 1
        first = BeatFire.objects.get()
        assert first.holder == a.lease.identity and first.token == 1

        # a freezes past its lease (simulated by expiring it); b takes over, reads the last
        # run a wrote, and fires the next slot, not the one a already fired.
        BeatLease.objects.update(expires_at=dj_timezone.now() - timedelta(seconds=1))
        tick_until_fired(b, 2)
        second = BeatFire.objects.get(token=2)
        assert second.slot > first.slot and second.holder == b.lease.identity

        # a froze right after a lease step (so it does not renew again before dispatching)
        # and wakes up believing it still leads, with the slot b fired due in its memory.
        assert a.lease.valid()
        a.lease.renew_at = float("inf")
        time.sleep(1.1)
        a.tick()
        assert not a.lease.valid()
        assert "fencing check failed" in caplog.text
        assert BeatFire.objects.filter(holder=a.lease.identity).count() == 1
        assert queue_length(redis_url, beat_queue) == fired_count()

        # b shuts down and releases: a takes over on its next tick.
        b.close()
        tick_until_fired(a, fired_count() + 1)
        assert BeatLease.objects.get().holder == a.lease.identity
        assert leaders == [1, 2, 3]
        messages = queue_length(redis_url, beat_queue)
        assert messages == fired_count() == len({f.slot for f in BeatFire.objects.all()})
        entry.refresh_from_db()
        assert entry.last_run_at == BeatFire.objects.order_by("-slot").first().slot
    finally:
        signals.lease_acquired.disconnect(dispatch_uid="t-sched")


def test_catchup_skip_and_the_published_headers(schedulers, beat_queue, redis_url):
    from kombu import Connection

    every_second(beat_queue, name="late", every=60)
    # Down for 150 s: the latest due slot of the minutely entry is 30 s late, beyond the grace.
    PeriodicTask.objects.filter(name="late").update(
        last_run_at=datetime.now(timezone.utc).replace(microsecond=0) - timedelta(seconds=150)
    )
    every_second(beat_queue, name="on-time")
    with override_settings(CELERY_GUARD_BEAT_POLICIES={"*": {"catchup": "skip"}}):
        scheduler = schedulers()
        wait_until(lambda: scheduler.tick() is not None and fired_count() >= 1, 10, interval=0.05)
    late = list(BeatFire.objects.filter(entry="late").values_list("status", flat=True))
    assert late == [BeatFire.Status.MISSED, BeatFire.Status.MISSED]
    fired = BeatFire.objects.get(entry="on-time", status=BeatFire.Status.FIRED)
    with Connection(redis_url) as conn:
        message = conn.SimpleQueue(beat_queue).get(timeout=5)
        headers = message.headers
        message.ack()
    beat = guard_headers.read(headers)[guard_headers.BEAT]
    assert beat["key"] == f"beat:on-time:{fired.slot:%Y-%m-%dT%H:%M:%S}Z"
    assert beat["token"] == fired.token
    assert headers["id"] == fired.task_id
    assert headers["periodic_task_name"] == "on-time"


def test_last_run_moved_back_by_hand_refires_nothing(schedulers, beat_queue, redis_url, caplog):
    entry = every_second(beat_queue)
    scheduler = schedulers()
    tick_until_fired(scheduler, 2)
    # An edit in the admin saves a stale last run (and signals a schedule change).
    entry.refresh_from_db()
    entry.last_run_at -= timedelta(seconds=2)
    entry.save()
    tick_until_fired(scheduler, 4)
    slots_fired = list(
        BeatFire.objects.filter(status=BeatFire.Status.FIRED).values_list("slot", flat=True)
    )
    assert len(slots_fired) == len(set(slots_fired))
    assert queue_length(redis_url, beat_queue) == len(slots_fired)
    assert ": taken" in caplog.text  # the fired slots were refused by their rows


def test_a_guarded_task_fired_by_beat_carries_the_slot_as_its_idempotency_key(
    schedulers, beat_queue
):
    from celery_guard.idempotency import keys
    from celery_guard.models import IdempotencyRecord
    from tests.testapp.tasks import beat_guarded_job

    every_second(beat_queue, name="guarded", task=beat_guarded_job.name)
    tick_until_fired(schedulers(), 1)
    fired = BeatFire.objects.get(entry="guarded", status=BeatFire.Status.FIRED)
    slot_key = f"beat:guarded:{fired.slot:%Y-%m-%dT%H:%M:%S}Z"
    record = IdempotencyRecord.objects.get(task_id=fired.task_id)
    assert record.key == keys.derive(beat_guarded_job.name, slot_key, {})
    # The same slot published again (a frozen ex-leader's late publish, a replayed fire)
    # returns the first task id and publishes nothing.
    again = beat_guarded_job.apply_async(guard={"idempotency_key": slot_key})
    assert again.id == fired.task_id
