"""The beat lease: the holder's state machine, against a fake store and clock."""

from __future__ import annotations

import pytest
from django.db import OperationalError

from celery_guard import signals
from celery_guard.beat import lease


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeStore:
    """A lease table of one row, with the same rules as the database operations."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.holder = ""
        self.token = 0
        self.expires = 0.0
        self.fail = False
        self.calls = 0

    def acquire_or_renew(self, name, holder, ttl):
        self.calls += 1
        if self.fail:
            raise OperationalError("server closed the connection unexpectedly")
        if self.holder == holder or self.expires < self.clock():
            if self.holder != holder:
                self.token += 1
            self.holder, self.expires = holder, self.clock() + ttl
            return lease.LeaseRecord(True, holder, self.token, None)
        return lease.LeaseRecord(False, self.holder, self.token, None)

    def release(self, name, holder):
        if self.holder != holder:
            return False
        self.expires = self.clock()
        return True


@pytest.fixture
def received():
    events = []

    def on_acquired(sender, **kw):
        events.append(("acquired", kw["holder"], kw["token"]))

    def on_lost(sender, **kw):
        events.append(("lost", kw["holder"], kw["token"]))

    signals.lease_acquired.connect(on_acquired, weak=False, dispatch_uid="t-acq")
    signals.lease_lost.connect(on_lost, weak=False, dispatch_uid="t-lost")
    yield events
    signals.lease_acquired.disconnect(dispatch_uid="t-acq")
    signals.lease_lost.disconnect(dispatch_uid="t-lost")


def make(clock, store, identity, ttl=3.0, renew_every=1.0):
    return lease.Lease(
        "lock", ttl, renew_every=renew_every, store=store, identity=identity, clock=clock
    )


def test_state_machine_acquire_renew_takeover_and_release(received, caplog):
    clock = FakeClock()
    store = FakeStore(clock)
    a, b = make(clock, store, "a"), make(clock, store, "b")

    assert a.step() is lease.Event.ACQUIRED and a.valid() and a.token == 1
    assert b.step() is lease.Event.STANDBY and not b.valid()
    clock.now += 0.5
    calls = store.calls
    assert a.step() is lease.Event.HELD and store.calls == calls  # renewal not due: no query
    clock.now += 0.6
    assert a.step() is lease.Event.RENEWED and a.token == 1

    # a freezes: its lease expires, b takes over with a new fencing token.
    clock.now += 3.1
    assert not a.valid()
    assert b.step() is lease.Event.ACQUIRED and b.token == 2
    assert a.step() is lease.Event.LOST and not a.valid()
    assert a.step() is lease.Event.STANDBY

    b.release()
    assert not b.valid()
    clock.now += 0.001
    assert a.step() is lease.Event.ACQUIRED and a.token == 3
    assert received == [
        ("acquired", "a", 1),
        ("acquired", "b", 2),
        ("lost", "a", 1),
        ("lost", "b", 2),
        ("acquired", "a", 3),
    ]
    assert "beat lease 'lock' lost by a (token 1): taken by b (token 2)" in caplog.text


def test_database_errors_stop_dispatching_only_once_the_lease_may_have_expired(received):
    clock = FakeClock()
    store = FakeStore(clock)
    beat_lease = make(clock, store, "a")
    assert beat_lease.step() is lease.Event.ACQUIRED
    store.fail = True
    clock.now += 1.5
    assert beat_lease.step() is lease.Event.ERROR
    assert beat_lease.valid()  # still inside the term the database granted
    clock.now += 1.6
    assert beat_lease.step() is lease.Event.LOST and not beat_lease.valid()
    store.fail = False
    assert (
        beat_lease.step() is lease.Event.ACQUIRED and beat_lease.token == 1
    )  # nobody took it meanwhile
    assert [e[0] for e in received] == ["acquired", "lost", "acquired"]


def test_a_renewal_elsewhere_extends_the_local_deadline():
    clock = FakeClock()
    beat_lease = make(clock, FakeStore(clock), "a")
    beat_lease.step()
    clock.now += 2.5
    beat_lease.extended(clock.now)
    clock.now += 2.0
    assert beat_lease.valid()


def test_renewal_interval_is_capped_at_a_third_of_the_lease():
    clock = FakeClock()
    assert make(clock, FakeStore(clock), "a", ttl=30, renew_every=60).renew_every == 10
