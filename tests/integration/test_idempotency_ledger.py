"""Ledger backends: the same state machine on the database and on Redis (parametrized)."""

import time

import pytest

from celery_guard.idempotency import ledger
from celery_guard.models import IdempotencyRecord

pytestmark = pytest.mark.django_db(transaction=True)

FP, OTHER_FP = "a" * 64, "b" * 64


def claim(idem_store, key="t:k", task_id="t1", fp=FP, window=60.0, grace=None):
    return idem_store.claim(
        key, task_name="t", task_id=task_id, fingerprint=fp, window=window, grace=grace
    )


def start(idem_store, owner, key="t:k", task_id="t1", lease=60.0, window=60.0):
    return idem_store.start(
        key,
        task_name="t",
        task_id=task_id,
        fingerprint=FP,
        window=window,
        owner=owner,
        lease=lease,
    )


def test_claim_duplicate_conflict_and_own_republish(idem_store):
    assert claim(idem_store) == ledger.Claim("claimed", "t1", FP)
    assert claim(idem_store, task_id="t2") == ledger.Claim("duplicate", "t1", FP)
    assert claim(idem_store, task_id="t3", fp=OTHER_FP) == ledger.Claim("conflict", "t1", FP)
    # The holder republishing (a retry) keeps its claim.
    assert claim(idem_store, task_id="t1").outcome == "claimed"
    record = idem_store.get("t:k")
    assert (record["state"], record["task_id"], record["fencing_token"]) == ("pending", "t1", 0)


def test_window_expiry_release_and_unclaim_free_the_key(idem_store):
    assert claim(idem_store, window=0.2).outcome == "claimed"
    assert claim(idem_store, task_id="t2").outcome == "duplicate"
    time.sleep(0.3)
    assert claim(idem_store, task_id="t2", fp=OTHER_FP) == ledger.Claim("claimed", "t2", OTHER_FP)
    assert idem_store.release("t:k", task_id="someone-else") is False
    assert idem_store.release("t:k", task_id="t2") is True
    assert idem_store.release("t:k") is False  # already released
    assert claim(idem_store, task_id="t3").outcome == "claimed"
    assert idem_store.unclaim("t:k", "t3") is True
    assert idem_store.get("t:k")["state"] == "released"
    assert claim(idem_store, task_id="t4").outcome == "claimed"


def test_a_release_that_keeps_succeeded_keys_leaves_a_success_alone(idem_store):
    claim(idem_store)
    run = start(idem_store, "w")
    assert idem_store.finish("t:k", owner="w", token=run.fencing_token, state="succeeded")
    assert idem_store.release("t:k", task_id="t1", keep_succeeded=True) is False
    assert idem_store.get("t:k")["state"] == "succeeded"
    assert start(idem_store, "w2", task_id="t2").outcome == "skip"
    assert idem_store.release("t:k", task_id="t1") is True  # an operator's release still frees it


def test_start_runs_once_then_skips(idem_store):
    claim(idem_store)
    first = start(idem_store, "w1")
    assert (first.outcome, first.fencing_token) == ("run", 1)
    assert idem_store.finish("t:k", owner="w1", token=1, state="succeeded") is True
    again = start(idem_store, "w2", task_id="t1")
    assert (again.outcome, again.task_id) == ("skip", "t1")
    assert idem_store.get("t:k")["state"] == "succeeded"


def test_start_without_a_claim_and_busy_while_a_live_owner_runs(idem_store):
    # A message published without the enqueue claim (a replay) still gets a record.
    assert start(idem_store, "w1", key="t:new", task_id="x").fencing_token == 1
    busy = start(idem_store, "w2", key="t:new", task_id="y")
    assert busy.outcome == "busy"
    assert busy.task_id == "x"
    assert 0 < busy.retry_in <= 60


def test_takeover_after_the_lease_expired_fences_the_stale_owner(idem_store):
    claim(idem_store)
    stale = start(idem_store, "w1", lease=0.2)
    assert start(idem_store, "w2").outcome == "busy"
    time.sleep(0.3)
    new = start(idem_store, "w2")
    assert new.outcome == "run"
    assert new.fencing_token == stale.fencing_token + 1
    # The stale owner can no longer complete, fail or yield the key; the new one can.
    assert (
        idem_store.finish("t:k", owner="w1", token=stale.fencing_token, state="succeeded") is False
    )
    assert idem_store.finish("t:k", owner="w1", token=stale.fencing_token, state="failed") is False
    assert idem_store.yield_lease("t:k", owner="w1", token=stale.fencing_token) is False
    assert idem_store.finish("t:k", owner="w2", token=new.fencing_token, state="succeeded") is True
    record = idem_store.get("t:k")
    assert (record["state"], record["owner"], record["fencing_token"]) == ("succeeded", "w2", 2)


def test_failed_and_yielded_runs_can_start_again(idem_store):
    claim(idem_store)
    run = start(idem_store, "w1")
    assert idem_store.yield_lease("t:k", owner="w1", token=run.fencing_token) is True
    retry = start(idem_store, "w2")
    assert (retry.outcome, retry.fencing_token) == ("run", 2)
    assert idem_store.finish("t:k", owner="w2", token=2, state="failed") is True
    assert claim(idem_store, task_id="t2").outcome == "duplicate"  # a failed key still blocks
    assert start(idem_store, "w3").outcome == "run"  # but a redelivery may run it


def test_succeeded_key_runs_again_after_its_window(idem_store):
    claim(idem_store, window=0.2)
    run = start(idem_store, "w1", window=0.2)
    idem_store.finish("t:k", owner="w1", token=run.fencing_token, state="succeeded")
    assert start(idem_store, "w2", window=0.2).outcome == "skip"
    time.sleep(0.3)
    assert start(idem_store, "w2", window=0.2).outcome == "run"


def test_finish_rejects_other_states(idem_store):
    with pytest.raises(ValueError, match="succeeded or failed"):
        idem_store.finish("t:k", owner="w", token=1, state="released")


def test_database_purge_keeps_live_and_recent_records(settings):
    idem_store = ledger.DatabaseLedger()
    claim(idem_store, key="t:old", window=0.1)
    claim(idem_store, key="t:live", window=0.1)
    start(idem_store, "w1", key="t:live", lease=60)
    claim(idem_store, key="t:recent", window=60)
    time.sleep(0.2)
    assert idem_store.purge(retention=0) == 1
    assert set(IdempotencyRecord.objects.values_list("key", flat=True)) == {"t:live", "t:recent"}
    assert idem_store.purge(retention=3600) == 0


def test_a_yielded_run_may_still_fail_until_the_next_attempt_starts(idem_store):
    claim(idem_store)
    run = start(idem_store, "w1")
    idem_store.yield_lease("t:k", owner="w1", token=run.fencing_token)
    assert idem_store.finish("t:k", owner="w1", token=1, state="succeeded") is False
    assert idem_store.finish("t:k", owner="w1", token=1, state="failed") is True
    assert idem_store.get("t:k")["state"] == "failed"
    start(idem_store, "w2")
    idem_store.yield_lease("t:k", owner="w2", token=2)
    start(idem_store, "w3")
    assert idem_store.finish("t:k", owner="w2", token=2, state="failed") is False


def test_renewing_a_lease_keeps_the_key_and_a_lost_lease_cannot_be_renewed(idem_store):
    from celery_guard import LeaseLost
    from celery_guard.idempotency.dedup import RunContext

    claim(idem_store)
    run = start(idem_store, "w1", lease=0.3)
    ctx = RunContext("t:k", run.fencing_token, "w1", "t1", idem_store)
    time.sleep(0.2)
    ctx.renew(lease=0.5)
    time.sleep(0.2)
    assert start(idem_store, "w2").outcome == "busy"  # 0.4 s in: alive thanks to the renewal
    time.sleep(0.4)
    with pytest.raises(LeaseLost):
        ctx.renew()  # expired: a renewal cannot resurrect it
    assert start(idem_store, "w2").outcome == "run"
    assert idem_store.renew("t:k", owner="w1", token=1, lease=10) is False


def test_a_claim_is_provisional_until_its_publish_is_confirmed(idem_store):
    assert claim(idem_store, grace=0.2) == ledger.Claim("claimed", "t1", FP)
    record = idem_store.get("t:k")
    assert (record["state"], record["owner"]) == ("pending", "")
    assert record["lease_expires_at"] is not None  # the publish deadline
    assert claim(idem_store, task_id="t2").outcome == "duplicate"
    assert idem_store.confirm("t:k", "t2") is False  # not the holder
    assert idem_store.confirm("t:k", "t1") is True
    assert idem_store.get("t:k")["lease_expires_at"] is None
    assert idem_store.confirm("t:k", "t1") is False  # confirmed already
    time.sleep(0.3)
    # Past the grace a confirmed claim still holds the key for its whole window.
    assert claim(idem_store, task_id="t2") == ledger.Claim("duplicate", "t1", FP)
    assert claim(idem_store, task_id="t3", fp=OTHER_FP).outcome == "conflict"


def test_an_unconfirmed_claim_is_taken_over_after_the_grace(idem_store):
    claim(idem_store, grace=0.2)
    # Inside the grace the producer may still be publishing: a duplicate, as usual.
    assert claim(idem_store, task_id="t2", grace=0.2) == ledger.Claim("duplicate", "t1", FP)
    time.sleep(0.3)
    # Past it the claim was abandoned, whatever the new call's arguments.
    taken = claim(idem_store, task_id="t2", fp=OTHER_FP, grace=0.2)
    assert taken == ledger.Claim("claimed", "t2", OTHER_FP, abandoned="t1")
    record = idem_store.get("t:k")
    assert (record["state"], record["task_id"], record["owner"]) == ("pending", "t2", "")
    assert record["lease_expires_at"] is not None
    # The dead producer's confirm (had it only been slow) changes nothing.
    assert idem_store.confirm("t:k", "t1") is False
    assert claim(idem_store, task_id="t3", fp=OTHER_FP).outcome == "duplicate"  # in its grace
    assert idem_store.confirm("t:k", "t2") is True
    time.sleep(0.3)
    assert claim(idem_store, task_id="t3", fp=OTHER_FP).task_id == "t2"  # confirmed: holds


def test_a_worker_starts_an_unconfirmed_claim_and_a_late_confirm_leaves_it_running(idem_store):
    claim(idem_store, grace=0.2)
    run = start(idem_store, "w1", lease=60)  # consumed before the producer confirmed
    assert (run.outcome, run.fencing_token) == ("run", 1)
    assert idem_store.confirm("t:k", "t1") is False
    record = idem_store.get("t:k")
    assert (record["state"], record["owner"], record["fencing_token"]) == ("running", "w1", 1)
    assert record["lease_expires_at"] is not None  # the worker's lease, untouched
    time.sleep(0.3)
    # Past the publish grace: the run's live lease holds the key, nothing is taken over.
    assert claim(idem_store, task_id="t2") == ledger.Claim("duplicate", "t1", FP)
    assert start(idem_store, "w2", task_id="t2").outcome == "busy"
    assert idem_store.finish("t:k", owner="w1", token=1, state="succeeded") is True


def test_a_run_that_gave_its_lease_back_for_a_retry_is_not_abandoned(idem_store):
    claim(idem_store, grace=0.1)
    idem_store.confirm("t:k", "t1")
    run = start(idem_store, "w1", lease=0.1)
    idem_store.yield_lease("t:k", owner="w1", token=run.fencing_token)
    time.sleep(0.2)  # the old lease and the grace are both over
    assert claim(idem_store, task_id="t2", grace=0.1) == ledger.Claim("duplicate", "t1", FP)
    assert idem_store.confirm("t:k", "t1") is False
    assert start(idem_store, "w2").fencing_token == 2  # the retry runs


def test_the_redis_ledger_is_built_once_per_process(redis_url):
    from django.test import override_settings

    with override_settings(
        CELERY_GUARD_IDEMPOTENCY_BACKEND="redis", CELERY_GUARD_IDEMPOTENCY_REDIS_URL=redis_url
    ):
        first, second = ledger.get_ledger(), ledger.get_ledger()
        # One client and connection pool, not a new connection per enqueue and per run.
        assert first is second
        with override_settings(CELERY_GUARD_IDEMPOTENCY_REDIS_PREFIX="cg-other:"):
            other = ledger.get_ledger()
        assert other is not first
        assert other.prefix == "cg-other:"


def test_a_run_of_a_key_claimed_at_enqueue_does_not_try_an_insert():
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    store = ledger.DatabaseLedger()
    store.claim("order-sql", task_name="t", task_id="id-1", fingerprint="f", window=60)
    with CaptureQueriesContext(connection) as queries:
        start = store.start(
            "order-sql",
            task_name="t",
            task_id="id-1",
            fingerprint="f",
            window=60,
            owner="w",
            lease=30,
        )
    assert start.outcome == "run"
    assert not [
        q for q in queries.captured_queries if q["sql"].lstrip().upper().startswith("INSERT")
    ]


def test_a_confirmed_claim_never_started_is_taken_over_after_its_start_by(idem_store):
    claim(idem_store)
    assert idem_store.confirm("t:k", "t1", start_within=0.3) is True
    assert idem_store.get("t:k")["start_by"] is not None
    # Before its start-by time the message may still be queued: a duplicate, as usual.
    assert claim(idem_store, task_id="t2") == ledger.Claim("duplicate", "t1", FP)
    time.sleep(0.4)
    # Past it the message was lost: the next call takes the key over and publishes again.
    taken = claim(idem_store, task_id="t2", fp=OTHER_FP)
    assert taken == ledger.Claim("claimed", "t2", OTHER_FP, "t1", never_started=True)
    record = idem_store.get("t:k")
    assert (record["state"], record["task_id"], record["start_by"]) == ("pending", "t2", None)
    assert record["lease_expires_at"] is not None  # a new claim: unconfirmed again
    # The lost message, should it turn up after all, runs once; the new one then skips.
    assert start(idem_store, "w1").outcome == "run"
    assert idem_store.finish("t:k", owner="w1", token=1, state="succeeded") is True
    assert start(idem_store, "w2", task_id="t2").outcome == "skip"


def test_a_started_claim_is_never_taken_over_as_never_started(idem_store):
    claim(idem_store)
    idem_store.confirm("t:k", "t1", start_within=0.1)
    run = start(idem_store, "w1", lease=60)
    assert idem_store.get("t:k")["start_by"] is None
    idem_store.yield_lease("t:k", owner="w1", token=run.fencing_token)  # a Celery retry
    time.sleep(0.2)
    assert claim(idem_store, task_id="t2") == ledger.Claim("duplicate", "t1", FP)


def test_a_confirmed_claim_waits_the_start_grace_by_default(idem_store, settings):
    settings.CELERY_GUARD_IDEMPOTENCY_START_GRACE = 0.1
    claim(idem_store)
    idem_store.confirm("t:k", "t1")
    time.sleep(0.2)
    assert claim(idem_store, task_id="t2").never_started is True


def test_claim_many_decides_each_key_like_claim_and_confirm_many_confirms_the_pairs(idem_store):
    claim(idem_store, key="t:same")
    claim(idem_store, key="t:other", fp=OTHER_FP)
    claim(idem_store, key="t:dead", task_id="t0", grace=0.1)
    time.sleep(0.2)
    news = [
        ledger.NewClaim(key, f"n{i}", FP, 60.0)
        for i, key in enumerate(["t:a", "t:same", "t:other", "t:dead", "t:b"])
    ]
    assert idem_store.claim_many(news, task_name="t", grace=30) == [
        ledger.Claim("claimed", "n0", FP),
        ledger.Claim("duplicate", "t1", FP),
        ledger.Claim("conflict", "t1", OTHER_FP),
        ledger.Claim("claimed", "n3", FP, abandoned="t0"),
        ledger.Claim("claimed", "n4", FP),
    ]
    new = idem_store.get("t:a")
    assert (new["state"], new["task_id"], new["owner"], new["task_name"]) == (
        "pending",
        "n0",
        "",
        "t",
    )
    assert new["lease_expires_at"] is not None  # provisional until confirmed
    # Only the batch's own pairs change: not a key held by another task.
    pairs = [("t:a", "n0"), ("t:same", "n1"), ("t:dead", "n3"), ("t:b", "n4")]
    assert idem_store.confirm_many(pairs, 30) == 3
    for key in ("t:a", "t:dead", "t:b"):
        record = idem_store.get(key)
        assert (record["lease_expires_at"], record["start_by"] is not None) == (None, True)
    assert idem_store.get("t:same")["task_id"] == "t1"
    assert idem_store.claim_many([], task_name="t") == []
    assert idem_store.confirm_many([]) == 0
    # get_many: the records that exist, by key, as get() returns them.
    found = idem_store.get_many(["t:a", "t:nothing", "t:same"])
    assert found == {"t:a": idem_store.get("t:a"), "t:same": idem_store.get("t:same")}


def test_a_start_and_a_new_claim_are_one_statement_each():
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    store = ledger.DatabaseLedger()
    with CaptureQueriesContext(connection) as claimed:
        store.claim("order-one", task_name="t", task_id="id-1", fingerprint="f", window=60)
    # No BEGIN/ROLLBACK around an insert that may meet the key: it skips it instead.
    assert [q["sql"].split()[0].upper() for q in claimed.captured_queries] == ["INSERT"]
    with CaptureQueriesContext(connection) as started:
        run = store.start(
            "order-one",
            task_name="t",
            task_id="id-1",
            fingerprint="f",
            window=60,
            owner="w",
            lease=30,
        )
    # The UPDATE returns the fencing token it wrote: no SELECT after it (one commit).
    assert len(started.captured_queries) == 1
    assert "RETURNING" in started.captured_queries[0]["sql"]
    assert (run.outcome, run.fencing_token) == ("run", 1)
    assert store.get("order-one")["fencing_token"] == 1
    # An existing key is not inserted over, and its claim still decides as before.
    assert store.claim(
        "order-one", task_name="t", task_id="id-2", fingerprint="f", window=60
    ) == ledger.Claim("duplicate", "id-1", "f")


def test_a_keyed_run_costs_two_statements_and_a_duplicate_decision_three():
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    store = ledger.DatabaseLedger()
    claim(store, key="order-two", task_id="id-1")
    assert store.confirm("order-two", "id-1", 30)
    with CaptureQueriesContext(connection) as run:
        started = start(store, "w", key="order-two", task_id="id-1")
        assert store.finish("order-two", owner="w", token=started.fencing_token, state="succeeded")
    # The worker side of a keyed delivery: the start and the end, one round trip (and one
    # commit) each.
    assert [q["sql"].split()[0].upper() for q in run.captured_queries] == ["UPDATE", "UPDATE"]
    with CaptureQueriesContext(connection) as duplicate:
        decided = claim(store, key="order-two", task_id="id-2")
    assert decided == ledger.Claim("duplicate", "id-1", FP)
    assert [q["sql"].split()[0].upper() for q in duplicate.captured_queries] == [
        "INSERT",
        "UPDATE",
        "SELECT",
    ]
    # A redelivery of the key that succeeded reads the record it could not take: a skip.
    skip = start(store, "v", key="order-two", task_id="id-1")
    assert (skip.outcome, skip.fencing_token, skip.task_id) == ("skip", 1, "id-1")
    holder = start(store, "w", key="order-busy", task_id="id-3", lease=30)
    busy = start(store, "v", key="order-busy", task_id="id-4")
    assert (busy.outcome, busy.fencing_token, busy.task_id) == (
        "busy",
        holder.fencing_token,
        "id-3",
    )
    assert 0 < busy.retry_in <= 30


@pytest.mark.parametrize("idem_backend", ["redis"], indirect=True)
def test_an_unawaited_confirm_is_applied_before_the_next_command(idem_store, monkeypatch):
    claim(idem_store)
    # Sent behind CLIENT REPLY SKIP: nothing to wait for, and the next read sees it.
    assert idem_store.confirm("t:k", "t1", 30, wait=False) is True
    assert idem_store.get("t:k")["lease_expires_at"] is None
    assert idem_store._skips_replies is True
    # The connection it used holds no stray reply: the following commands answer in order.
    assert claim(idem_store, task_id="t2") == ledger.Claim("duplicate", "t1", FP)
    assert idem_store.client.ping() is True

    # A server that does not skip replies gets the usual call, and its answer.
    claim(idem_store, key="t:k2")
    monkeypatch.setattr(idem_store, "_skips_replies", False)
    assert idem_store.confirm("t:k2", "other", 30, wait=False) is False  # not the holder
    assert idem_store.confirm("t:k2", "t1", 30, wait=False) is True
    assert idem_store.get("t:k2")["lease_expires_at"] is None


@pytest.mark.parametrize("idem_backend", ["redis"], indirect=True)
def test_a_script_the_server_does_not_know_is_loaded_again(idem_store, monkeypatch):
    # As after SCRIPT FLUSH or a restart of Redis: EVALSHA answers NOSCRIPT.
    monkeypatch.setattr(idem_store._claim, "sha", "0" * 40)
    assert claim(idem_store).outcome == "claimed"
    assert idem_store._claim.sha != "0" * 40
    assert claim(idem_store, task_id="t2").outcome == "duplicate"


@pytest.mark.parametrize("idem_backend", ["redis"], indirect=True)
def test_enqueue_claims_keep_one_connection_that_recovers_when_the_server_drops_it(idem_store):
    assert claim(idem_store).outcome == "claimed"
    conn = idem_store._take()
    idem_store._give(conn)
    assert claim(idem_store, key="t:k2").outcome == "claimed"
    assert idem_store._take() is conn  # kept across claims, not the pool's
    conn.send_command("CLIENT", "ID")
    client_id = conn.read_response()
    idem_store._give(conn)
    idem_store.client.client_kill_filter(_id=client_id)
    # The dropped connection fails the claim's round trip; the claim is still decided.
    assert claim(idem_store, key="t:k3").outcome == "claimed"
    assert claim(idem_store, key="t:k3", task_id="t2").outcome == "duplicate"
    assert idem_store.client.ping() is True


@pytest.mark.parametrize("idem_backend", ["redis"], indirect=True)
def test_the_hot_path_keeps_its_connection_and_replaces_one_redis_closed(idem_store):
    import os

    run = start(idem_store, "w1")
    kept = idem_store._take()
    idem_store._give(kept)
    assert idem_store.finish("t:k", owner="w1", token=run.fencing_token, state="succeeded")
    # The same connection served both scripts: no pool checkout per command.
    assert idem_store._take() is kept
    kept.send_command("CLIENT", "ID")
    client_id = kept.read_response()
    idem_store._give(kept)

    # Redis drops it (a restart, its idle timeout): the next script reconnects and answers.
    assert idem_store.client.client_kill_filter(_id=client_id) == 1
    assert start(idem_store, "w2", key="t:k2").outcome == "run"
    assert idem_store.get("t:k2")["owner"] == "w2"

    # A forked child never uses its parent's connections.
    parent = idem_store._take()
    idem_store._give(parent)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os._exit(0 if idem_store._take() is not parent else 1)
    assert os.waitpid(pid, 0)[1] == 0
    assert idem_store._take() is parent
