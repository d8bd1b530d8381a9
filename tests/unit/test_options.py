"""Unit tests of the guard option model: options declared by steps, validation, precedence."""

import pytest
from django.test import override_settings

from celery_guard.core import options
from celery_guard.routing.router import PRIORITY
from celery_guard.steps import GUARD


def test_every_option_belongs_to_the_step_that_declares_it():
    assert "priority" in GUARD.options
    declared = [option.name for step in GUARD.steps for option in step.options]
    assert sorted(declared) == sorted(GUARD.options.names())
    names = [step.name for step in GUARD.steps]
    assert len(names) == len(set(names)) and {"failures", "idempotency", "routing"} <= set(names)


def test_clean_rejects_unknown_option_with_a_suggestion():
    with pytest.raises(
        TypeError, match=r"unknown guard option 'priorty' \(did you mean 'priority'\?\)"
    ):
        GUARD.options.clean({"priorty": "high"}, where="@guarded_task")


def test_clean_names_the_option_on_a_bad_value():
    with pytest.raises(
        ValueError, match=r"@guarded_task option 'priority': 'urgent' is not a priority level"
    ):
        GUARD.options.clean({"priority": "urgent"}, where="@guarded_task")
    with pytest.raises(
        TypeError, match=r"@guarded_task option 'priority': expected a priority level name"
    ):
        GUARD.options.clean({"priority": 5}, where="@guarded_task")


def test_per_call_only_accepts_overridable_options():
    only = options.OptionSet(
        [options.GuardOption(name="_decoration_only", validate=lambda v: v, per_call=False)]
    )
    with pytest.raises(TypeError, match="cannot be overridden per call"):
        only.clean({"_decoration_only": 1}, where="apply_async", per_call=True)
    assert only.clean({"_decoration_only": 1}, where="@guarded_task") == {"_decoration_only": 1}


def test_declaring_a_name_twice_is_an_error():
    with pytest.raises(RuntimeError, match="declared twice"):
        options.OptionSet([PRIORITY, options.GuardOption(name="priority", validate=str)])


def test_precedence_call_over_decorator_over_setting_over_default():
    assert PRIORITY.resolve({"priority": "low"}, {"priority": "high"}) == "low"
    assert PRIORITY.resolve({}, {"priority": "high"}) == "high"
    with override_settings(CELERY_GUARD_DEFAULT_PRIORITY="low"):
        assert PRIORITY.resolve({}, {}) == "low"
    assert PRIORITY.resolve({}, {}) == "default"


def test_validation_follows_override_settings():
    with override_settings(CELERY_GUARD_PRIORITY_QUEUES={"urgent": "q-urgent", "default": "q"}):
        assert GUARD.options.clean({"priority": "urgent"}, where="x") == {"priority": "urgent"}
