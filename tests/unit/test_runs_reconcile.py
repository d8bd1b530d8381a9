"""The sweep's verdict on an open item of a run, from its key's ledger record."""

import datetime as dt

import pytest

from celery_guard.runs import reconcile

NOW = dt.datetime(2026, 12, 3, 12, 0, tzinfo=dt.timezone.utc)
LONG_AGO = NOW - dt.timedelta(seconds=1000)
RECENT = NOW - dt.timedelta(seconds=10)


def bounds(progressing=False):
    return reconcile.Bounds(NOW, stale=300, retry_slack=600, progressing=progressing)


def record(state, task_id="mine", owner="", lease=None, updated=LONG_AGO):
    return {
        "state": state,
        "task_id": task_id,
        "owner": owner,
        "lease_expires_at": lease,
        "updated_at": updated,
    }


@pytest.mark.parametrize(
    ("found", "progressing", "expected"),
    [
        (None, False, reconcile.LOST),  # never claimed, or the ledger lost it
        (None, True, reconcile.WAIT),
        (record("succeeded"), False, reconcile.SUCCEEDED),
        (record("succeeded", task_id="other"), True, reconcile.SKIPPED),
        (record("running", owner="w", lease=LONG_AGO), True, reconcile.LOST),  # worker gone
        (record("running", owner="w", lease=RECENT), False, reconcile.WAIT),  # redelivery due
        (record("pending"), False, reconcile.LOST),  # published, never started
        (record("pending"), True, reconcile.WAIT),  # behind the others in a moving queue
        (record("pending", updated=RECENT), False, reconcile.WAIT),
        (record("failed", updated=NOW - dt.timedelta(seconds=500)), False, reconcile.FAILING),
        (record("failed"), False, reconcile.LOST),  # past the longest backoff too
        (record("pending", owner="w", updated=RECENT), False, reconcile.WAIT),  # retry coming
        (record("running", task_id="other", owner="w", lease=RECENT), True, reconcile.WAIT),
    ],
)
def test_verdict(found, progressing, expected):
    assert reconcile.verdict("mine", found, bounds(progressing)) == expected
