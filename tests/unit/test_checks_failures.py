"""System checks of the failure pipeline: E001 for its settings, E005, W008."""

import pytest
from celery import current_app
from django.test import override_settings

from celery_guard import guarded_task
from celery_guard.backoff import Exponential
from celery_guard.failures import checks as failures_checks
from tests.support.checks import check_setting_values
from tests.unit.test_checks import ids


@pytest.mark.parametrize(
    "bad",
    [
        {"CELERY_GUARD_MAX_ATTEMPTS": 0},
        {"CELERY_GUARD_MAX_ATTEMPTS": "5"},
        {"CELERY_GUARD_BACKOFF": "exponential"},
        {"CELERY_GUARD_BACKOFF": (1, -1)},
        {"CELERY_GUARD_DEADLINE": -1},
        {"CELERY_GUARD_UNKNOWN_ERRORS": "retry"},
        {"CELERY_GUARD_ERROR_CLASSIFIER": 42},
        {"CELERY_GUARD_MAX_THROTTLED": -1},
        {"CELERY_GUARD_MAX_WORKER_LOST": 0},
        {"CELERY_GUARD_DEAD_LETTER_WRITE_TRIES": 0},
        {"CELERY_GUARD_SOFT_TIME_LIMIT": "30"},
        {"CELERY_GUARD_TIME_LIMIT": 0},
        {"CELERY_GUARD_CAPTURE_UNGUARDED": 1},
    ],
)
def test_e001_invalid_failure_settings(bad):
    assert check_setting_values() == []
    with override_settings(**bad):
        messages = check_setting_values()
    assert ids(messages) == ["celery_guard.E001"]
    assert next(iter(bad)) in messages[0].msg


def test_valid_failure_settings_pass():
    with override_settings(
        CELERY_GUARD_BACKOFF=Exponential(base=2, cap=300),
        CELERY_GUARD_DEADLINE=3600,
        CELERY_GUARD_UNKNOWN_ERRORS="permanent",
        CELERY_GUARD_SOFT_TIME_LIMIT=30,
        CELERY_GUARD_TIME_LIMIT=40.5,
    ):
        assert check_setting_values() == []


def not_callable():
    pass


NOT_CALLABLE = 3


def test_e005_classifier_must_import_as_a_callable():
    assert failures_checks.check_classifier() == []
    with override_settings(
        CELERY_GUARD_ERROR_CLASSIFIER="tests.unit.test_checks_failures.not_callable"
    ):
        assert failures_checks.check_classifier() == []
    for path, text in [
        ("tests.unit.test_checks_failures.missing", "cannot be imported"),
        ("tests.unit.test_checks_failures.NOT_CALLABLE", "is not callable"),
    ]:
        with override_settings(CELERY_GUARD_ERROR_CLASSIFIER=path):
            [message] = failures_checks.check_classifier()
        assert message.id == "celery_guard.E005"
        assert text in message.msg


@override_settings(CELERY_GUARD_SCHEDULE=None)
def test_w008_retry_delay_longer_than_the_visibility_timeout(celery_conf):
    celery_conf(
        broker_url="redis://127.0.0.1:6379/0", broker_transport_options={"visibility_timeout": 900}
    )
    assert failures_checks.check_retry_delay_visibility() == []  # default cap 600s

    @guarded_task(name="tests.checks.slow_retry", backoff=(10, 3600))
    def slow_retry():
        pass

    try:
        # With the delivery schedule on, a retry waits in the schedule, not in a worker.
        for held_by in ("auto", "redis", "database"):
            with override_settings(CELERY_GUARD_SCHEDULE=held_by):
                assert failures_checks.check_retry_delay_visibility() == []
        [message] = failures_checks.check_retry_delay_visibility()
        assert message.id == "celery_guard.W008"
        assert "tests.checks.slow_retry (3600s)" in message.msg
        celery_conf(broker_transport_options={"visibility_timeout": 7200})
        assert failures_checks.check_retry_delay_visibility() == []
        celery_conf(broker_url="amqp://guest@localhost//")
        assert failures_checks.check_retry_delay_visibility() == []
    finally:
        current_app.tasks.pop("tests.checks.slow_retry", None)
