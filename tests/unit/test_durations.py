"""Durations: NaN, infinities and absurd values are refused by the checks, options and per call."""

import math
from datetime import timedelta

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings

from celery_guard import durations, guarded_task
from celery_guard.conf import guard_settings
from tests.support import checks
from tests.testapp import idem_tasks

SECONDS = (
    "DEDUP_WINDOW",
    "IDEMPOTENCY_LEASE",
    "IDEMPOTENCY_PUBLISH_GRACE",
    "IDEMPOTENCY_START_GRACE",
    "IDEMPOTENCY_RETENTION",
    "BEAT_LEASE_SECONDS",
    "SOFT_TIME_LIMIT",
    "TIME_LIMIT",
    "DLQ_RETENTION_DAYS",
)
ABSURD = (math.nan, math.inf, -math.inf, 1e12)


@pytest.mark.parametrize("value", ABSURD, ids=repr)
@pytest.mark.parametrize("name", SECONDS)
def test_e001_refuses_nan_infinite_and_absurd_durations(name, value):
    assert checks.check_setting_values() == []
    with override_settings(**{f"CELERY_GUARD_{name}": value}):
        [message] = checks.check_setting_values()
    assert message.id == "celery_guard.E001"
    assert f"CELERY_GUARD_{name}" in message.msg


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("DEDUP_WINDOW", timedelta(days=367)),
        ("BEAT_LEASE_SECONDS", 2 * 86400),
        ("DLQ_RETENTION_DAYS", 1e-9),  # would purge rows replayed a moment ago
        ("DLQ_RETENTION_DAYS", 0.5),
        ("BACKOFF", 1e12),
        ("DEADLINE", math.inf),
        ("BEAT_POLICIES", {"*": {"overlap_timeout": math.nan}}),
    ],
)
def test_e001_bounds(name, value):
    with override_settings(**{f"CELERY_GUARD_{name}": value}):
        [message] = checks.check_setting_values()
    assert f"CELERY_GUARD_{name}" in message.msg


def test_the_documented_bounds_are_accepted():
    with override_settings(
        CELERY_GUARD_DEDUP_WINDOW=timedelta(days=366),
        CELERY_GUARD_IDEMPOTENCY_RETENTION=366 * 86400,
        CELERY_GUARD_BEAT_LEASE_SECONDS=86400,
        CELERY_GUARD_DLQ_RETENTION_DAYS=1,
        CELERY_GUARD_TIME_LIMIT=timedelta(hours=2),
    ):
        assert checks.check_setting_values() == []
        assert guard_settings.time_limit == 7200.0


@pytest.mark.parametrize("value", ABSURD, ids=repr)
def test_a_process_that_skipped_the_checks_gets_an_error_naming_the_setting(value):
    with override_settings(CELERY_GUARD_IDEMPOTENCY_LEASE=value, CELERY_GUARD_DEDUP_WINDOW=value):
        with pytest.raises(ImproperlyConfigured, match="CELERY_GUARD_IDEMPOTENCY_LEASE"):
            _ = guard_settings.idempotency_lease
        # A keyed enqueue fails before the ledger, naming the setting.
        with pytest.raises(ImproperlyConfigured, match="CELERY_GUARD_DEDUP_WINDOW"):
            idem_tasks.idem_atomic.apply_async(args=["x"])


@pytest.mark.parametrize("value", ABSURD, ids=repr)
def test_per_call_and_decorator_windows_name_the_option(value):
    with pytest.raises(ValueError, match=r"apply_async\(guard=\.\.\.\) option 'dedup_window'"):
        idem_tasks.idem_race.apply_async(args=[1], guard={"dedup_window": value})
    with pytest.raises(ValueError, match="@guarded_task option 'dedup_window'"):
        guarded_task(idempotency_key="k", dedup_window=value)


def test_guard_that_is_not_a_dict_names_guard():
    with pytest.raises(
        TypeError, match=r"apply_async\(guard=\.\.\.\): guard options must be a dict"
    ):
        idem_tasks.idem_race.apply_async(args=[1], guard="high")


def test_the_validator():
    assert durations.seconds(timedelta(minutes=1)) == 60.0
    assert durations.seconds(0, allow_minimum=True) == 0.0
    with pytest.raises(TypeError):
        durations.seconds(True)
    with pytest.raises(ValueError, match="finite"):
        durations.seconds(math.nan)
    with pytest.raises(ValueError, match="at most 31622400 seconds"):
        durations.seconds(durations.MAX_SECONDS + 1)


def test_no_check_crashes_on_a_bad_duration(celery_conf):
    from celery_guard import checks as all_checks

    celery_conf(broker_url="redis://127.0.0.1:6379/0")  # W007 reads the windows on Redis
    settings = {f"CELERY_GUARD_{name}": math.nan for name in SECONDS}
    with override_settings(**settings):
        messages = [message for check in all_checks.ALL for message in check()]
    assert {m.id for m in messages if m.id == "celery_guard.E001"}
