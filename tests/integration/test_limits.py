"""Limits on a real Redis: the admission script under contention, leases, policies, admin."""

from __future__ import annotations

import importlib
import logging
import multiprocessing
import os
import signal
import threading
import time
import uuid
from typing import Any

import pytest
import redis
from celery.exceptions import Retry
from django.contrib.admin.models import LogEntry
from django.core.exceptions import ValidationError
from django.db import DatabaseError, connection, connections, transaction
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from celery_guard.exceptions import ThrottledError
from celery_guard.limits import dbstore, services, store
from celery_guard.limits.models import LimitEntry, LimitScope, TaskPolicy
from celery_guard.limits.rules import Rate, Rule
from celery_guard.limits.step import LimitsStep
from tests.support.harness import wait_until
from tests.support.limits import fresh_prefix
from tests.testapp import limit_tasks

#: A store test runs on both backends (``limits_backend``); the database one commits for real,
#: so the test's threads and processes see each other's admissions.
STORE_TEST = pytest.mark.django_db(transaction=True)


@STORE_TEST
def test_concurrency_is_never_exceeded_by_contending_threads(limits_store):
    limits = limits_store
    rule = Rule("task:contended", concurrency=2)
    inside, peak, admitted = 0, 0, 0
    lock = threading.Lock()

    def worker() -> None:
        nonlocal inside, peak, admitted
        end = time.monotonic() + 1.0
        try:
            while time.monotonic() < end:
                admission = limits.admit([rule], lease=30)
                if not admission.admitted:
                    assert admission.kind == "concurrency" and admission.rule == rule
                    # A refused run is deferred, not retried at once: spinning threads would
                    # starve the releases of the write lock on SQLite.
                    time.sleep(0.002)
                    continue
                with lock:
                    inside += 1
                    peak = max(peak, inside)
                    admitted += 1
                time.sleep(0.005)
                with lock:
                    inside -= 1
                limits.release([rule], admission.holder)
        finally:
            connections.close_all()  # this thread's own database connection

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak == 2  # reached, never exceeded
    assert admitted > 10
    assert limits.holders(rule) == 0


def _store_in_child(backend: str, prefix: str) -> store.LimitsStore:
    if backend == "redis":
        return store.Store(os.environ["REDIS_URL"], prefix)
    return dbstore.DatabaseStore()


def _hammer(
    backend: str, prefix: str, rule: Rule, seconds: float, out: multiprocessing.Queue
) -> None:
    limits = _store_in_child(backend, prefix)
    count = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if limits.admit([rule], lease=30).admitted:
            count += 1
    out.put(count)


@STORE_TEST
def test_rate_holds_across_processes(limits_backend, redis_url):
    prefix = fresh_prefix()
    # A minute's window: nothing leaves it during the test, so exactly N starts are admitted.
    rule = Rule("limit:shared", rate=Rate(7, 60.0))
    out: multiprocessing.Queue = multiprocessing.Queue()
    procs = [
        multiprocessing.Process(target=_hammer, args=(limits_backend, prefix, rule, 1.0, out))
        for _ in range(4)
    ]
    connections.close_all()  # a forked child must open its own connection, not share ours
    for p in procs:
        p.start()
    counts = [out.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(10)
    assert sum(counts) == 7


@STORE_TEST
def test_rate_window_slides_and_says_when_it_frees_a_start(limits_store):
    limits = limits_store
    rule = Rule("task:sliding", rate=Rate(3, 1.0))
    assert all(limits.admit([rule], lease=30).admitted for _ in range(3))
    refused = limits.admit([rule], lease=30)
    assert not refused.admitted and refused.kind == "rate"
    assert 0 < refused.wait <= 1.0
    time.sleep(refused.wait + 0.05)
    assert limits.admit([rule], lease=30).admitted


@STORE_TEST
def test_all_rules_admit_or_none_is_taken(limits_store):
    limits = limits_store
    own, shared = Rule("task:a", concurrency=5), Rule("limit:gw", concurrency=1)
    first = limits.admit([own, shared], lease=30)
    assert first.admitted
    second = limits.admit([own, shared], lease=30)
    assert not second.admitted and second.rule == shared
    assert limits.holders(own) == 1  # the refused run took no slot of the first rule
    limits.release([own, shared], first.holder)
    assert limits.holders(own) == 0 and limits.holders(shared) == 0


def _hold_forever(backend: str, prefix: str, rule: Rule, ready: multiprocessing.Event) -> None:
    assert _store_in_child(backend, prefix).admit([rule], lease=1.5).admitted
    ready.set()
    time.sleep(600)


@STORE_TEST
def test_slot_of_a_killed_holder_returns_after_its_lease(limits_backend, redis_url):
    prefix = fresh_prefix()
    rule = Rule("task:killed", concurrency=1)
    ready = multiprocessing.Event()
    holder = multiprocessing.Process(
        target=_hold_forever, args=(limits_backend, prefix, rule, ready)
    )
    connections.close_all()  # a forked child must open its own connection, not share ours
    holder.start()
    assert ready.wait(30)
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(10)
    limits = _store_in_child(limits_backend, prefix)
    assert not limits.admit([rule], lease=30).admitted  # still held by the dead process
    wait_until(lambda: limits.admit([rule], lease=30).admitted, timeout=5, interval=0.1)


def test_unreachable_store_raises_unavailable_then_fails_fast(monkeypatch):
    monkeypatch.setattr(store, "_paused_until", 0.0)
    limits = store.Store("redis://127.0.0.1:1/0", "x:")
    with pytest.raises(store.Unavailable):
        limits.admit([Rule("task:x", concurrency=1)], lease=30)
    started = time.monotonic()
    with pytest.raises(store.Unavailable, match="moments ago"):
        limits.admit([Rule("task:x", concurrency=1)], lease=30)
    assert time.monotonic() - started < 0.5
    monkeypatch.setattr(store, "_paused_until", 0.0)


@pytest.mark.django_db
def test_policies_are_cached_and_reread_after_the_refresh(settings):
    settings.CELERY_GUARD_POLICY_REFRESH = 60
    services.forget()
    assert services.current("app.tasks.x") is None
    services.set_paused("app.tasks.x", True, note="incident")
    assert services.current("app.tasks.x") is None  # cached: no query per task
    services.forget()
    assert services.current("app.tasks.x") == services.Policy(paused=True)
    services.set_limits("app.tasks.x", concurrency=2, rate="5/s")
    services.set_paused("app.tasks.x", False)
    services.forget()
    assert services.current("app.tasks.x") == services.Policy(False, 2, Rate(5, 1.0))
    with pytest.raises(ValueError):
        services.set_limits("app.tasks.x", rate="fast")
    services.forget()


@pytest.mark.django_db
def test_a_priority_override_names_a_level_and_one_that_left_the_settings_is_ignored(
    settings, caplog
):
    services.forget()
    with pytest.raises(ValidationError, match="'urgent' is not a priority level"):
        services.set_priority("app.tasks.x", "urgent")
    assert not TaskPolicy.objects.exists()  # nothing half-written
    services.set_priority("app.tasks.x", "low")
    assert services.for_publish("app.tasks.x") == services.Policy(priority="low")
    settings.CELERY_GUARD_PRIORITY_QUEUES = {"high": "q-high", "default": "q-default"}
    services.forget()
    assert services.current("app.tasks.x") is None
    assert "no longer defines; ignored" in caplog.text
    services.forget()


@pytest.mark.django_db(transaction=True)
def test_a_publish_in_a_failed_transaction_reads_no_policy_and_leaves_it_alone():
    services.forget()
    services.set_priority("app.tasks.x", "low")
    with transaction.atomic():
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT no_such_column FROM celery_guard_taskpolicy")
        except DatabaseError:
            transaction.set_rollback(True)
        # The transaction is broken: the cached policies answer, without a query.
        with CaptureQueriesContext(connection) as queries:
            services.for_publish("app.tasks.x")
        assert len(queries) == 0
    assert services.for_publish("app.tasks.x") == services.Policy(priority="low")
    services.forget()


@pytest.mark.django_db
def test_admin_pauses_and_resumes_task_types_in_the_admin_log(admin_client):
    TaskPolicy.objects.create(task_name="app.tasks.notify")
    url = reverse("admin:celery_guard_taskpolicy_changelist")
    row = TaskPolicy.objects.get()
    response = admin_client.post(
        url, {"action": "pause_selected", "_selected_action": [row.pk]}, follow=True
    )
    assert response.status_code == 200
    assert TaskPolicy.objects.get().paused
    assert LogEntry.objects.filter(change_message="paused (admin action)").count() == 1
    admin_client.post(url, {"action": "resume_selected", "_selected_action": [row.pk]})
    assert not TaskPolicy.objects.get().paused
    change = reverse("admin:celery_guard_taskpolicy_change", args=[row.pk])
    page = admin_client.post(
        change, {"task_name": "app.tasks.notify", "rate": "fast", "note": ""}
    ).content.decode()
    assert "is not a rate" in page
    admin_client.post(
        change, {"task_name": "app.tasks.notify", "rate": "10/m", "concurrency": "2", "note": ""}
    )
    assert TaskPolicy.objects.get().rate == "10/m"
    assert LogEntry.objects.filter(object_id=str(row.pk)).count() >= 3


@pytest.fixture
def running(settings):
    """Run a guarded task's limits step as a worker would, with a real Redis and broker."""
    settings.CELERY_GUARD_LIMITS_REDIS_PREFIX = f"cgt-limits-{uuid.uuid4().hex[:8]}:"
    services.forget()
    monkey = pytest.MonkeyPatch()
    monkey.setattr(services, "current", lambda name: None)  # no policy table needed here

    def run(task, args, body, guard=None):
        header = {"v": 2, "attempt": 1, "first_enqueued_at": time.time(), **(guard or {})}
        task.push_request(
            id=uuid.uuid4().hex,
            headers={"celery_guard": header},
            retries=0,
            is_eager=False,
            called_directly=False,
            delivery_info={"exchange": "", "routing_key": "cgt-limits-none"},
            args=list(args),
            kwargs={},
        )
        try:
            return LimitsStep().run(task, tuple(args), {}, body)
        finally:
            task.pop_request()

    yield run
    monkey.undo()


@STORE_TEST
def test_an_over_limit_delivery_is_deferred_without_an_attempt(
    limits_backend, running, monkeypatch
):
    published = []
    monkeypatch.setattr(
        "celery.canvas.Signature.apply_async", lambda sig, *a, **kw: published.append(sig)
    )
    limits = store.get_store()
    rule = Rule(f"task:{limit_tasks.limited_job.name}", concurrency=1)
    held = limits.admit([rule], lease=30)
    with pytest.raises(Retry) as retried:
        running(limit_tasks.limited_job, ["x"], lambda *a: pytest.fail("ran over its limit"))
    [again] = published
    guard = again.options["headers"]["celery_guard"]
    assert guard["deferred"] == 1 and guard["attempt"] == 1
    assert again.options["retries"] == 0 and 0 < again.options["countdown"] <= 30
    assert retried.value.sig is again
    limits.release([rule], held.holder)
    assert running(limit_tasks.limited_job, ["x"], lambda *a: "ran") == "ran"
    store.settle()  # the release is sent by the background thread
    assert limits.holders(rule) == 0  # released after the body


@STORE_TEST
def test_a_throttled_answer_backs_off_the_named_limit_for_the_cluster(limits_backend, running):
    def throttled(*args):
        raise ThrottledError("429", retry_after=1.5)

    with pytest.raises(ThrottledError):
        running(limit_tasks.gateway_job, ["x"], throttled)
    refused = store.get_store().admit([Rule("limit:test-gateway", concurrency=1)], lease=30)
    assert not refused.admitted and refused.kind == "backoff"
    assert 0 < refused.wait <= 1.5


def test_an_unreachable_store_fails_open_by_default_or_defers(
    running, settings, caplog, monkeypatch
):
    published = []
    monkeypatch.setattr(
        "celery.canvas.Signature.apply_async", lambda sig, *a, **kw: published.append(sig)
    )
    settings.CELERY_GUARD_LIMITS_REDIS_URL = "redis://127.0.0.1:1/0"
    store._paused_until = 0.0
    with caplog.at_level(logging.WARNING, logger="celery_guard.limits.step"):
        assert running(limit_tasks.limited_job, ["x"], lambda *a: "ran") == "ran"
    assert "WITHOUT their limits" in caplog.text
    settings.CELERY_GUARD_LIMITS_ON_OUTAGE = "defer"
    with pytest.raises(Retry, match="throttled by unavailable"):
        running(limit_tasks.limited_job, ["x"], lambda *a: pytest.fail("ran"))
    assert len(published) == 1
    store._paused_until = 0.0


@STORE_TEST
def test_a_release_sent_in_the_background_is_settled_before_the_next_admission(limits_store):
    # Serial jobs under concurrency=1 in one process: without settle(), the next admission
    # races the previous body's release still in flight and is refused.
    limits = limits_store
    rule = Rule("task:serial", concurrency=1)
    for _ in range(30):
        store.settle()
        admission = limits.admit([rule], lease=30)
        assert admission.admitted, admission
        store.release_later(limits, [rule], admission.holder)
    store.settle()
    assert limits.holders(rule) == 0


def test_the_packed_admission_recovers_from_a_script_flush_and_a_dropped_connection(settings):
    # The admission is sent packed on a kept connection; after SCRIPT FLUSH (or a restart of
    # Redis) EVALSHA answers NOSCRIPT, and a kept connection the server closed fails on use:
    # both must still admit (the Script call loads the script and reconnects), and count.
    limits = store.Store(settings.CELERY_GUARD_LIMITS_REDIS_URL, fresh_prefix())
    rule = Rule("task:packed", concurrency=2)
    first = limits.admit([rule], lease=30)
    assert first.admitted and limits._kept.idle, "the admission keeps its connection"
    limits.client.script_flush()
    second = limits.admit([rule], lease=30)
    assert second.admitted
    kept = limits._kept.idle[-1]
    kept.send_command("CLIENT", "ID")
    limits.client.client_kill_filter(_id=int(kept.read_response()))
    refused = limits.admit([rule], lease=30)
    assert not refused.admitted and refused.kind == "concurrency"  # two slots held: counted
    limits.release([rule], first.holder)
    assert limits.admit([rule], lease=30).admitted
    assert limits.holders(rule) == 2


def test_a_release_sent_unanswered_runs_again_after_a_script_flush(settings):
    # The Redis store sends a body's release without waiting for the answer. If Redis no
    # longer knows the script (SCRIPT FLUSH, a restart), the answer read later is NOSCRIPT:
    # the release must then be run again, or the slot stays taken for its whole lease.
    limits = store.Store(settings.CELERY_GUARD_LIMITS_REDIS_URL, fresh_prefix())
    rule = Rule("task:unanswered", concurrency=1)
    admission = limits.admit([rule], lease=30)
    limits.client.script_flush()
    store.release_later(limits, [rule], admission.holder)
    limits.flush()
    assert limits.holders(rule) == 0
    assert limits.admit([rule], lease=30).admitted


@pytest.mark.parametrize("read_by", ["flush", "next admission"])
def test_a_release_lost_with_its_connection_is_sent_again(settings, read_by):
    # The release is written to the kept connection, then the connection dies before Redis
    # ran it (the server paused writes, then killed the client): reading its answer fails,
    # and the release must be sent again on a new connection.
    limits = store.Store(settings.CELERY_GUARD_LIMITS_REDIS_URL, fresh_prefix())
    rule = Rule("task:lost-release", concurrency=1)
    admission = limits.admit([rule], lease=30)
    kept = limits._kept.idle[-1]
    kept.send_command("CLIENT", "ID")
    client_id = int(kept.read_response())
    control = redis.Redis.from_url(settings.CELERY_GUARD_LIMITS_REDIS_URL)
    control.client_pause(5000, all=False)  # writes (scripts) wait; CLIENT KILL does not
    try:
        limits.release_unanswered([rule], admission.holder)
        assert control.client_kill_filter(_id=client_id) == 1
    finally:
        control.client_unpause()
    if read_by == "flush":
        limits.flush()
        assert limits.holders(rule) == 0
    # The next admission goes on the dead connection first: the release must be run again
    # before it, or the one slot is still taken.
    assert limits.admit([rule], lease=30).admitted
    assert limits.holders(rule) == 1


def test_a_background_release_that_fails_is_logged_and_does_not_block_the_next(caplog):
    class Unreachable:
        def release(self, rules, holder):
            raise store.Unavailable("connection refused")

    rule = Rule("task:unreachable", concurrency=1)
    with caplog.at_level(logging.WARNING, logger="celery_guard.limits.store"):
        store.release_later(Unreachable(), [rule], "holder-1")
        store.settle(timeout=5)
        assert store._unsent == 0
    assert "could not release the limit slots of holder-1" in caplog.text


@STORE_TEST
def test_a_running_body_keeps_its_slot_past_the_lease_by_renewal(limits_store):
    limits = limits_store
    rule = Rule("task:renewed", concurrency=1)
    admission = limits.admit([rule], lease=0.6)
    store.hold(limits, [rule], admission.holder, 0.6)
    try:
        time.sleep(1.5)  # well past the lease: renewed meanwhile
        assert limits.holders(rule) == 1
        assert not limits.admit([rule], lease=0.6).admitted
    finally:
        store.drop(admission.holder)
    # No longer renewed (the body "died" without a release): the slot comes back.
    wait_until(lambda: limits.admit([rule], lease=30).admitted, timeout=5, interval=0.1)


@pytest.mark.django_db(transaction=True)
def test_the_database_store_purges_what_no_longer_counts():
    limits = dbstore.DatabaseStore()
    gone, kept, paused = (
        Rule("task:gone", concurrency=1),
        Rule("task:kept", concurrency=1),
        Rule("limit:paused", rate=Rate(5, 60.0)),
    )
    old = limits.admit([gone], lease=0.01)
    live = limits.admit([kept], lease=30)
    assert old.admitted and live.admitted and limits.admit([paused], lease=30).admitted
    limits.back_off([paused], 60)
    LimitEntry.objects.filter(scope="limit:paused").delete()  # only its back-off is left
    time.sleep(dbstore.PURGE_GRACE + 0.1)
    assert limits.purge() == 2  # the expired slot and its scope
    assert set(LimitScope.objects.values_list("scope", flat=True)) == {"task:kept", "limit:paused"}
    assert list(LimitEntry.objects.values_list("holder", flat=True)) == [live.holder]
    refused = limits.admit([paused], lease=30)
    assert not refused.admitted and refused.kind == "backoff"  # the back-off survived


@pytest.mark.django_db(transaction=True)
def test_a_long_scope_is_stored_under_a_unique_digest():
    limits = dbstore.DatabaseStore()
    one, two = Rule("tenant:" + "x" * 300, concurrency=1), Rule("tenant:" + "x" * 299 + "y", 1)
    assert limits.admit([one], lease=30).admitted
    assert limits.admit([two], lease=30).admitted  # not the same scope
    assert not limits.admit([one], lease=30).admitted
    assert all(len(s) <= 255 for s in LimitScope.objects.values_list("scope", flat=True))


def _contend(
    rules: list[Rule],
    seconds: float,
    inside: Any,
    peak: Any,
    out: multiprocessing.Queue,
) -> None:
    # A process of its own, so a connection of its own: admissions race for real row locks.
    limits = dbstore.DatabaseStore()
    admitted = unavailable = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            admission = limits.admit(rules, lease=30)
        except store.Unavailable:  # a deadlock or a lock that could not be taken
            unavailable += 1
            time.sleep(dbstore.OUTAGE_PAUSE)
            continue
        if not admission.admitted:
            time.sleep(0.001)
            continue
        with inside.get_lock():
            inside.value += 1
            peak.value = max(peak.value, inside.value)
        admitted += 1
        time.sleep(0.002)
        with inside.get_lock():
            inside.value -= 1
        limits.release(rules, admission.holder)
    out.put((admitted, unavailable))


@pytest.mark.django_db(transaction=True)
def test_concurrent_admissions_on_postgresql_never_exceed_the_cap(postgres):
    # The one-call admission (migration 0011) counts after it holds the scopes' locks: in
    # READ COMMITTED each statement of the function sees the entries the admissions before
    # it committed. Eight processes, two rules in both orders (a shared scope: deadlock-free
    # only if every caller locks in scope order), a cap of 3 on the task's rule.
    own = Rule("task:capped", concurrency=3)
    shared = Rule("limit:capped-shared", concurrency=5, rate=Rate(1_000_000, 1.0))
    inside = multiprocessing.Value("i", 0)
    peak = multiprocessing.Value("i", 0)
    out: multiprocessing.Queue = multiprocessing.Queue()
    procs = [
        multiprocessing.Process(
            target=_contend,
            args=([own, shared] if i % 2 else [shared, own], 1.5, inside, peak, out),
        )
        for i in range(8)
    ]
    connections.close_all()  # a forked child must open its own connection, not share ours
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(10)
    assert sum(unavailable for _, unavailable in results) == 0
    assert sum(admitted for admitted, _ in results) > 50
    assert peak.value == 3  # reached, never exceeded
    assert dbstore.DatabaseStore().holders(own) == 0


@pytest.mark.django_db(transaction=True)
def test_a_database_admission_is_one_round_trip_on_postgresql(postgres):
    from django.test.utils import CaptureQueriesContext

    limits = dbstore.DatabaseStore()
    limits._next_purge = float("inf")  # the periodic purge is not the admission
    rules = [Rule("task:trips", concurrency=1, rate=Rate(10, 60.0)), Rule("limit:trips", 2)]
    with CaptureQueriesContext(connections["default"]) as taken:
        first = limits.admit(rules, lease=30)
    with CaptureQueriesContext(connections["default"]) as refused:
        second = limits.admit(rules, lease=30)
    assert first.admitted
    assert not second.admitted and second.rule == rules[0] and second.kind == "concurrency"
    assert 29 < second.wait <= 30
    assert len(taken) == len(refused) == 1
    kinds = set(LimitEntry.objects.values_list("scope", "kind"))
    assert kinds == {("task:trips", "c"), ("task:trips", "r"), ("limit:trips", "c")}


@pytest.mark.django_db
def test_the_database_store_ping_fails_without_the_admission_function(postgres):
    from django.db import DatabaseError, transaction

    migration = importlib.import_module("celery_guard.migrations.0011_limits_admit_function")
    limits = dbstore.DatabaseStore()
    limits.ping()
    with pytest.raises(DatabaseError, match="celery_guard_limits_admit"), transaction.atomic():
        with connections["default"].cursor() as cursor:
            cursor.execute(migration.DROP)  # rolled back with the savepoint
        limits.ping()
    limits.ping()


@pytest.mark.django_db(transaction=True)
def test_the_database_store_prepares_its_statements_per_session_and_a_lost_one_runs_unprepared(
    postgres, caplog
):
    # Parsing and planning the release's DELETE costs the server more than running it: the
    # admission's call and the release are prepared once per session (autocommit only).
    limits = dbstore.DatabaseStore()
    limits._next_purge = float("inf")  # the periodic purge is not the admission
    connection = connections[limits.alias]
    rules = [Rule("task:prepared", concurrency=1, rate=Rate(10, 60.0))]

    def prepared() -> set[str]:
        with connection.cursor() as cursor:
            cursor.execute("SELECT name FROM pg_prepared_statements")
            return {name for (name,) in cursor.fetchall()}

    connection.close()  # a new session
    first = limits.admit(rules, lease=30)
    refused = limits.admit(rules, lease=30)
    assert first.admitted
    assert not refused.admitted and refused.kind == "concurrency" and 29 < refused.wait <= 30
    limits.release(rules, first.holder)
    assert limits.holders(rules[0]) == 0
    assert prepared() == {"celery_guard_limits_admit_call", "celery_guard_limits_release"}
    with connection.cursor() as cursor:
        cursor.execute("DEALLOCATE ALL")  # the session loses them (a pooler's reset)
    with caplog.at_level(logging.WARNING, logger="celery_guard.core.prepared"):
        second = limits.admit(rules, lease=30)
    assert second.admitted
    assert "celery_guard_limits_admit_call failed; running it unprepared" in caplog.text
    limits.release(rules, second.holder)
    assert limits.holders(rules[0]) == 0
    assert LimitEntry.objects.filter(kind=LimitEntry.Kind.START).count() == 2
    assert prepared() == set()  # this session prepares nothing any more
