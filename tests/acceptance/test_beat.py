"""Guarded beat on PostgreSQL with real ``celery beat`` processes and a real worker.

One run of three beats (lease 3 s, loop 1 s) with two 1-second entries goes through: steady
state, SIGKILL of the leader, SIGSTOP of the next leader past its lease and SIGCONT after a
takeover, and ``pg_terminate_backend`` of the beats' connections. Throughout, executions on
the worker are counted per slot key: no slot may run twice, and every slot in the run must
be accounted for (fired, or recorded missed during a takeover).
"""

from __future__ import annotations

import collections
import itertools
import signal
import time
from datetime import datetime, timedelta, timezone

import pytest
from django.db import connection
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from celery_guard.beat import slots
from celery_guard.models import BeatFire, BeatLease, OutboxMessage
from tests.support.beat import KILLED_AFTER_CLAIM, Beat
from tests.support.harness import wait_until
from tests.testapp.models import Execution

pytestmark = pytest.mark.django_db(transaction=True)

LEASE = 3.0
TICK = 1.0
#: Scheduling noise allowed on a loaded 2-core CI machine on top of lease + one tick.
SLACK = 2.0
ENTRIES = ("beat-a", "beat-b")


@pytest.fixture
def beats(postgres, test_db_name, redis_url):
    started: list[Beat] = []

    def start(count):
        new = [
            Beat(broker_url=redis_url, db_name=test_db_name, lease_seconds=LEASE, name=f"b{i}")
            for i in range(len(started), len(started) + count)
        ]
        for beat in new:
            beat.launch()
        for beat in new:
            beat.wait_ready()
        started.extend(new)
        return new

    yield start
    for beat in started:
        if beat.process is not None and beat.process.poll() is None:
            beat.signal(signal.SIGCONT)  # a stopped process cannot handle SIGTERM
        beat.stop()


def lease() -> BeatLease:
    return BeatLease.objects.get()


def leader(running):
    """The running Beat that holds the lease now."""
    row = wait_until(lambda: BeatLease.objects.filter(expires_at__gt=_db_now()).first(), 20)
    pid = int(row.holder.split(":")[1])
    [beat] = [b for b in running if b.pid == pid]
    return beat, row


def _db_now() -> datetime:
    with connection.cursor() as cursor:
        cursor.execute("SELECT now()")
        return cursor.fetchone()[0]


def fired(entry=None):
    qs = BeatFire.objects.filter(status=BeatFire.Status.FIRED)
    return qs.filter(entry=entry) if entry else qs


def wait_fires(count, timeout=30):
    target = {e: fired(e).count() + count for e in ENTRIES}
    wait_until(lambda: all(fired(e).count() >= target[e] for e in ENTRIES), timeout)


def takeover(old_row, running):
    """Wait for a new term after ``old_row``'s; return its row and the new leader."""
    new_row = wait_until(
        lambda: BeatLease.objects.filter(token__gt=old_row.token).first(), LEASE + 15
    )
    assert new_row.holder != old_row.holder
    return new_row, leader(running)[0]


def every_second_from_now(name: str, queue: str, **fields) -> PeriodicTask:
    """A 1-second ``beat_job`` entry whose first slot is the next whole second."""
    interval, _ = IntervalSchedule.objects.get_or_create(every=1, period=IntervalSchedule.SECONDS)
    return PeriodicTask.objects.create(
        name=name,
        task="tests.testapp.tasks.beat_job",
        interval=interval,
        queue=queue,
        last_run_at=datetime.now(timezone.utc).replace(microsecond=0),
        **fields,
    )


def terminate_beat_connections(db_name) -> int:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = %s AND application_name LIKE 'cg-beat-%%'",
            [db_name],
        )
        return int(cursor.fetchone()[0])


def test_three_beats_fire_every_slot_once_through_kill_freeze_and_db_loss(
    beats, start_worker, queues, test_db_name
):
    start_worker(["default"], concurrency=2)
    every_second, _ = IntervalSchedule.objects.get_or_create(
        every=1, period=IntervalSchedule.SECONDS
    )
    begin = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(seconds=1)
    for name in ENTRIES:
        PeriodicTask.objects.create(
            name=name,
            task="tests.testapp.tasks.beat_job",
            interval=every_second,
            queue=queues["default"],
            last_run_at=begin,
        )
    running = beats(3)

    # Steady state: one leader, every 1-second slot fires.
    wait_fires(8)
    first_leader, first_row = leader(running)
    steady_until = fired().order_by("-slot").first().slot

    # SIGKILL the leader: a standby takes over within lease + one tick of its last renewal.
    first_leader.signal(signal.SIGKILL)
    first_leader.process.wait(10)
    killed_row = lease()
    running.remove(first_leader)
    second_row, second_leader = takeover(killed_row, running)
    gap = (second_row.acquired_at - killed_row.expires_at).total_seconds()
    assert gap <= TICK + SLACK, gap
    wait_fires(3)

    # SIGSTOP the new leader past its lease; another takes over; SIGCONT the old one.
    second_leader.signal(signal.SIGSTOP)
    third_row, _ = takeover(second_row, [b for b in running if b is not second_leader])
    wait_fires(3)
    second_leader.signal(signal.SIGCONT)
    wait_fires(4)

    # Kill the beats' database connections a few times while they run.
    terminated = 0
    for _ in range(4):
        terminated += terminate_beat_connections(test_db_name)
        time.sleep(0.7)
    assert terminated > 0
    wait_fires(4)

    for beat in running:
        beat.stop()
    assert lease().expires_at <= _db_now(), "the last leader released the lease on shutdown"
    total = fired().count()
    runs = wait_until(
        lambda: list(Execution.objects.all()) if Execution.objects.count() >= total else None, 30
    )
    time.sleep(1)  # anything published twice would run now
    runs = list(Execution.objects.all())

    # Every fired slot ran exactly once on the worker, and nothing ran that was not fired.
    per_key = collections.Counter(r.label for r in runs)
    assert [k for k, n in per_key.items() if n > 1] == []
    keys = {slots.slot_key(f.entry, f.slot) for f in fired()}
    assert set(per_key) == keys
    for name in ENTRIES:
        rows = list(BeatFire.objects.filter(entry=name).order_by("slot"))
        # Every slot from the first to the last is accounted for: fired, or recorded as missed
        # by the catch-up of a new leader; no hole, no slot twice (the unique constraint).
        seconds = [(r.slot - rows[0].slot).total_seconds() for r in rows]
        assert seconds == list(range(len(rows))), [(r.slot, r.status) for r in rows]
        assert {r.status for r in rows} <= {BeatFire.Status.FIRED, BeatFire.Status.MISSED}
        # Steady state under one leader: every slot fired, none missed. (Slots that were due
        # before the first leader was up are recorded missed by its catch-up: not steady.)
        first_fired = next(r.slot for r in rows if r.status == BeatFire.Status.FIRED)
        steady = [r for r in rows if first_fired <= r.slot <= steady_until]
        assert len(steady) >= 8 and {r.status for r in steady} == {BeatFire.Status.FIRED}
        # Fencing: a later slot was never fired by an earlier leadership term.
        tokens = [r.token for r in rows if r.status == BeatFire.Status.FIRED]
        assert tokens == sorted(tokens)
        assert {first_row.token, second_row.token, third_row.token} <= set(tokens)
    logs = "".join(b.log_path.read_text(errors="replace") for b in running)
    assert "database error" in logs


def test_overlap_skip_waits_for_the_running_slot_on_a_real_worker(start_worker, queues):
    """A 1-second entry whose run takes ~2.5 s, with ``overlap = skip``: runs never overlap.

    The worker-side receivers mark each fire row started and finished; the scheduler (in this
    process, on this run's database) skips slots while the previous run is unfinished.
    """
    from celery import current_app
    from django.test import override_settings

    from celery_guard.beat import GuardedScheduler

    start_worker(["default"], concurrency=2)
    every_second_from_now("slow", queues["default"], kwargs='{"sleep_ms": 2500}')
    policies = {"slow": {"overlap": "skip"}}
    with override_settings(CELERY_GUARD_BEAT_POLICIES=policies):
        scheduler = GuardedScheduler(app=current_app._get_current_object(), max_interval=1)
        try:
            deadline = time.monotonic() + 8
            while time.monotonic() < deadline:
                time.sleep(max(0.0, min(scheduler.tick(), 0.2)))
        finally:
            scheduler.close()
    rows = list(BeatFire.objects.filter(entry="slow").order_by("slot"))
    statuses = [r.status for r in rows]
    assert (
        statuses.count(BeatFire.Status.SKIPPED) >= 3 and statuses.count(BeatFire.Status.FIRED) >= 2
    )
    total = statuses.count(BeatFire.Status.FIRED)
    runs = wait_until(
        lambda: (
            list(Execution.objects.order_by("started_at"))
            if Execution.objects.count() >= total
            else None
        ),
        30,
    )
    assert len(runs) == total
    for earlier, later in itertools.pairwise(runs):
        assert later.started_at >= earlier.finished_at  # never two runs at once
    wait_until(lambda: not BeatFire.objects.filter(status="fired", finished_at=None).exists(), 10)
    assert all(r.started_at and r.finished_at for r in BeatFire.objects.filter(status="fired"))


def test_a_beat_killed_between_claim_and_publish_still_runs_the_slot_once(
    start_worker, queues, redis_url, test_db_name
):
    """The claim writes the slot's message as an outbox row; the worker's poller publishes it."""
    start_worker(["default"])
    every_second_from_now("killed", queues["default"])
    beat = Beat(
        broker_url=redis_url,
        db_name=test_db_name,
        lease_seconds=LEASE,
        name="killed",
        scheduler=KILLED_AFTER_CLAIM,
    )
    beat.launch()
    try:
        assert beat.process.wait(30) == -signal.SIGKILL
    finally:
        beat.stop()
    # One slot fired (a slow start may also have recorded older slots as missed).
    [fire] = BeatFire.objects.filter(entry="killed", status=BeatFire.Status.FIRED)
    assert OutboxMessage.objects.count() == 1
    key = slots.slot_key("killed", fire.slot)
    row = OutboxMessage.objects.get(task_id=fire.task_id)
    assert row.state == "pending"  # claimed and committed, never published by the beat
    wait_until(lambda: Execution.objects.filter(label=key).exists(), 30)
    wait_until(lambda: OutboxMessage.objects.get(pk=row.pk).state == "dispatched", 10)
    time.sleep(3)  # room for a duplicate to show up
    assert Execution.objects.filter(label=key).count() == 1
    assert Execution.objects.count() == 1
