"""Decoration-time validation of @guarded_task: mistakes fail at import, naming the option."""

import pytest
from celery.contrib.django.task import DjangoTask

from celery_guard import GuardedTask, guarded_task


def test_without_parentheses_gives_a_guarded_task():
    @guarded_task
    def bare(x):
        return x

    assert isinstance(bare, GuardedTask)
    assert isinstance(bare, DjangoTask)
    assert bare.guard_options == {}
    assert bare.acks_late is True
    assert bare.reject_on_worker_lost is True
    assert bare.serializer == "json"


def test_with_options_keeps_celery_options_and_guard_options():
    @guarded_task(priority="high", name="tests.named", max_retries=7, time_limit=30)
    def named(x):
        return x

    assert named.name == "tests.named"
    assert named.max_retries == 7
    assert named.time_limit == 30
    assert named.guard_options == {"priority": "high"}


def test_safe_defaults_can_be_overridden_explicitly():
    @guarded_task(acks_late=False)
    def early(x):
        return x

    assert early.acks_late is False


def test_unknown_option_is_a_type_error_naming_it():
    with pytest.raises(
        TypeError, match=r"unknown option 'acks_lates' \(did you mean 'acks_late'\?\)"
    ):

        @guarded_task(acks_lates=True)
        def f():
            pass


def test_wrong_type_and_value_name_the_option():
    with pytest.raises(TypeError, match="option 'priority'"):

        @guarded_task(priority=9)
        def f():
            pass

    with pytest.raises(ValueError, match=r"option 'priority': 'urgnt' is not a priority level"):

        @guarded_task(priority="urgnt")
        def g():
            pass


def test_pickle_serializer_is_refused():
    with pytest.raises(ValueError, match="option 'serializer': guarded tasks publish JSON"):

        @guarded_task(serializer="pickle")
        def f():
            pass


def test_base_must_be_a_guarded_task():
    with pytest.raises(TypeError, match="option 'base': must be a subclass of GuardedTask"):

        @guarded_task(base=DjangoTask)
        def f():
            pass

    class Custom(GuardedTask):
        pass

    @guarded_task(base=Custom)
    def g():
        pass

    assert isinstance(g, Custom)


def test_delay_on_commit_is_inherited_from_django_task():
    assert GuardedTask.delay_on_commit is not DjangoTask.delay_on_commit
    assert issubclass(GuardedTask, DjangoTask)
