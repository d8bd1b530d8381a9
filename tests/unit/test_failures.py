"""Failure pipeline pieces with no service: options, policies, delays, malformed headers."""

import datetime as dt

import pytest
from celery import current_app
from django.test import override_settings

from celery_guard import guarded_task
from celery_guard.backoff import Exponential, Fixed, Schedule
from celery_guard.failures import retry
from tests.testapp import fail_tasks


@pytest.fixture
def make_task():
    names = []

    def make(**opts):
        name = f"tests.failures.task{len(names)}"
        names.append(name)

        def body():
            pass

        return guarded_task(name=name, **opts)(body)

    yield make
    for name in names:
        current_app.tasks.pop(name, None)


def test_failure_options_are_validated_at_decoration(make_task):
    task = make_task(
        max_attempts=5,
        backoff=(10, 30, 120, 600),
        deadline=dt.timedelta(hours=2),
        retry_on=(KeyError,),
        give_up_on=ConnectionError,
        soft_time_limit=30,
        time_limit=40,
    )
    assert task.guard_options["backoff"] == Schedule((10, 30, 120, 600))
    assert task.guard_options["deadline"] == 7200.0
    assert task.guard_options["give_up_on"] == (ConnectionError,)
    assert (task.soft_time_limit, task.time_limit) == (30, 40)
    assert make_task(backoff=2).guard_options["backoff"] == Fixed(2)
    for opts, error, text in [
        ({"max_attempts": 0}, ValueError, "'max_attempts': must be >= 1"),
        ({"max_attempts": "3"}, TypeError, "'max_attempts'"),
        ({"backoff": "fast"}, TypeError, "'backoff'"),
        ({"backoff": (1, -1)}, ValueError, "'backoff'"),
        ({"deadline": -5}, ValueError, "'deadline'"),
        ({"deadline": "2h"}, TypeError, "'deadline'"),
        ({"retry_on": (int,)}, TypeError, "'retry_on': expected exception classes"),
        ({"give_up_on": "ValueError"}, TypeError, "'give_up_on'"),
        ({"max_attemps": 3}, TypeError, "did you mean 'max_attempts'"),
    ]:
        with pytest.raises(error, match=text):
            make_task(**opts)


def test_failure_options_are_not_per_call(make_task):
    task = make_task()
    with pytest.raises(TypeError, match="'max_attempts' cannot be overridden per call"):
        task.apply_async(guard={"max_attempts": 2})


def test_policy_resolution_task_over_settings():
    task = fail_tasks.fail_always
    with override_settings(CELERY_GUARD_MAX_ATTEMPTS=9, CELERY_GUARD_DEADLINE=60):
        from celery_guard.failures import handler

        policy = handler.policy_for(task)
    assert policy.max_attempts == 3  # the decorator wins
    assert policy.deadline == 60.0  # the setting fills in
    assert policy.backoff == Fixed(0.1)
    assert handler.policy_for(fail_tasks.fail_permanent).backoff == Exponential()


def test_longest_delay():
    assert retry.longest_delay({"backoff": Schedule((1, 50, 3))}, Exponential()) == 50
    assert retry.longest_delay({}, Exponential(cap=70)) == 70


def test_broker_headers_of_the_wrong_type_do_not_break_the_pipeline():
    from celery_guard.failures import handler

    guard = {"consumed": "3", "throttled": True, "first_enqueued_at": [], "history": "x"}
    assert handler._number(guard, "consumed") == 0
    assert handler._number(guard, "throttled") == 0
    assert handler._number(guard, "first_enqueued_at", None) is None
    assert handler._history(guard) == []
    assert handler._number({"consumed": 2}, "consumed") == 2


def test_an_unimportable_classifier_is_logged_and_skipped(caplog):
    from celery_guard.failures import handler

    with override_settings(CELERY_GUARD_ERROR_CLASSIFIER="tests.nowhere.classify"):
        policy = handler.policy_for(fail_tasks.fail_permanent)
    assert policy.classifier is None
    assert "cannot be imported" in caplog.text
