"""The beat lease's database operations: the same rules on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from django.db import connection, transaction
from django.utils import timezone

from celery_guard.beat import lease
from celery_guard.models import BeatLease

pytestmark = pytest.mark.django_db(transaction=True)


def expire(name="lock"):
    BeatLease.objects.filter(name=name).update(expires_at=timezone.now() - timedelta(seconds=1))


def test_acquire_renew_takeover_fence_and_release_in_the_database():
    first = lease.acquire_or_renew("lock", "a", 30)
    assert first.held and first.token == 1
    row = BeatLease.objects.get(name="lock")
    assert row.holder == "a" and row.expires_at > row.renewed_at

    assert not lease.acquire_or_renew("lock", "b", 30).held
    renewed = lease.acquire_or_renew("lock", "a", 30)
    assert renewed.held and renewed.token == 1
    assert BeatLease.objects.get(name="lock").acquired_at == row.acquired_at

    expire()
    taken = lease.acquire_or_renew("lock", "b", 30)
    assert taken.held and taken.token == 2 and taken.holder == "b"
    assert BeatLease.objects.get(name="lock").acquired_at > row.acquired_at
    assert not lease.acquire_or_renew("lock", "a", 30).held
    assert not lease.fence("lock", "a", 1, 30)
    assert lease.fence("lock", "b", 2, 30)

    assert not lease.release("lock", "a")
    assert lease.release("lock", "b")
    again = lease.acquire_or_renew("lock", "a", 30)
    assert again.held and again.token == 3
    expire()
    assert not lease.fence("lock", "a", 3, 30)  # an expired term cannot fire any more
    assert lease.acquire_or_renew("lock", "a", 30).token == 3  # nobody else held it meanwhile


def test_lock_names_are_independent():
    assert lease.acquire_or_renew("eu", "a", 30).held
    assert lease.acquire_or_renew("us", "b", 30).held
    assert not lease.acquire_or_renew("eu", "b", 30).held


def test_racing_first_acquisitions_elect_exactly_one_holder():
    start = threading.Barrier(4)
    results = {}

    def contend(holder):
        try:
            start.wait()
            results[holder] = lease.acquire_or_renew("race", holder, 30).held
        finally:
            connection.close()

    threads = [threading.Thread(target=contend, args=(f"h{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results.values()) == [False, False, False, True]
    [winner] = [h for h, held in results.items() if held]
    assert BeatLease.objects.get(name="race").holder == winner


def test_a_shutdown_release_on_a_broken_connection_retries_on_a_new_one(caplog):
    holder = lease.Lease("lock", 30, renew_every=10, store=lease.DatabaseStore(), identity="a")
    assert holder.step() is lease.Event.ACQUIRED
    # As when the shutdown signal interrupts a query inside a transaction: this thread's
    # connection is dead and close() cannot replace it before the transaction block ends.
    with transaction.atomic():
        connection.ensure_connection()
        connection.connection.close()
        holder.release()
    assert "release failed" in caplog.text
    assert BeatLease.objects.get(name="lock").expires_at <= timezone.now()
    assert "released on shutdown" in caplog.text
