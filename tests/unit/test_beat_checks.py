"""System checks of the guarded beat settings: E006, W009 and the E001 value checks."""

import pytest
from celery import current_app
from django.test import override_settings

from celery_guard.beat import checks as beat_checks
from tests.support.checks import check_setting_values


@pytest.fixture
def loop_interval():
    conf = current_app.conf
    saved = conf.beat_max_loop_interval

    def set_(value):
        conf.beat_max_loop_interval = value

    yield set_
    conf.beat_max_loop_interval = saved


def test_e006_lease_shorter_than_twice_the_beat_loop(loop_interval):
    loop_interval(None)  # django-celery-beat's default loop: 5 s; default lease 30 s
    assert beat_checks.check_beat_lease() == []
    with override_settings(CELERY_GUARD_BEAT_LEASE_SECONDS=9):
        [message] = beat_checks.check_beat_lease()
    assert message.id == "celery_guard.E006"
    assert "(9s) is less than twice the beat loop interval (5s" in message.msg
    loop_interval(20)
    assert [m.id for m in beat_checks.check_beat_lease()] == ["celery_guard.E006"]
    with override_settings(CELERY_GUARD_BEAT_LEASE_SECONDS=40):
        assert beat_checks.check_beat_lease() == []
    with override_settings(CELERY_GUARD_BEAT_LEASE_SECONDS="long"):
        assert beat_checks.check_beat_lease() == []  # reported by E001 instead


@pytest.mark.parametrize(
    "bad",
    [
        {"CELERY_GUARD_BEAT_LOCK_NAME": ""},
        {"CELERY_GUARD_BEAT_LOCK_NAME": 7},
        {"CELERY_GUARD_BEAT_LEASE_SECONDS": 0},
        {"CELERY_GUARD_BEAT_LEASE_SECONDS": True},
        {"CELERY_GUARD_BEAT_POLICIES": ["nightly"]},
        {"CELERY_GUARD_BEAT_POLICIES": {"nightly": {"catchup": "everything"}}},
    ],
)
def test_e001_invalid_beat_settings(bad):
    assert check_setting_values() == []
    with override_settings(**bad):
        messages = check_setting_values()
    assert [m.id for m in messages] == ["celery_guard.E001"]
    assert next(iter(bad)) in messages[0].msg


def test_valid_beat_policies_pass():
    policies = {"nightly": {"catchup": "skip", "overlap": "skip", "overlap_timeout": 600}}
    with override_settings(CELERY_GUARD_BEAT_POLICIES=policies):
        assert check_setting_values() == []


def test_w009_unguarded_database_scheduler():
    conf = current_app.conf
    saved = conf.beat_scheduler
    try:
        conf.beat_scheduler = "celery.beat:PersistentScheduler"
        assert beat_checks.check_beat_scheduler() == []
        conf.beat_scheduler = "celery_guard.beat:GuardedScheduler"
        assert beat_checks.check_beat_scheduler() == []
        conf.beat_scheduler = "django_celery_beat.schedulers:DatabaseScheduler"
        [message] = beat_checks.check_beat_scheduler()
    finally:
        conf.beat_scheduler = saved
    assert message.id == "celery_guard.W009"
    assert "GuardedScheduler" in message.hint


def test_w028_sentry_monitor_without_sentry_sdk(monkeypatch):
    policies = {"nightly": {"sentry_monitor": True}, "*": {"catchup": "skip"}}
    with override_settings(CELERY_GUARD_BEAT_POLICIES=policies):
        assert beat_checks.check_sentry_monitors() == []  # sentry-sdk is installed here
        monkeypatch.setattr(beat_checks, "sentry_installed", lambda: False)
        [message] = beat_checks.check_sentry_monitors()
    assert message.id == "celery_guard.W028"
    assert "sentry_monitor for ['nightly']" in message.msg
    with override_settings(CELERY_GUARD_BEAT_POLICIES={"nightly": {"sentry_monitor": False}}):
        assert beat_checks.check_sentry_monitors() == []
