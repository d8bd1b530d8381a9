"""Unit tests of the guard option model: registry, validation, precedence."""

import pytest
from django.test import override_settings

from celery_guard import options


def test_priority_is_registered_by_its_feature_module():
    import celery_guard.routing  # noqa: F401

    assert "priority" in options.registered()


def test_clean_rejects_unknown_option_with_a_suggestion():
    with pytest.raises(
        TypeError, match=r"unknown guard option 'priorty' \(did you mean 'priority'\?\)"
    ):
        options.clean({"priorty": "high"}, where="@guarded_task")


def test_clean_names_the_option_on_a_bad_value():
    with pytest.raises(
        ValueError, match=r"@guarded_task option 'priority': 'urgent' is not a priority level"
    ):
        options.clean({"priority": "urgent"}, where="@guarded_task")
    with pytest.raises(
        TypeError, match=r"@guarded_task option 'priority': expected a priority level name"
    ):
        options.clean({"priority": 5}, where="@guarded_task")


def test_per_call_only_accepts_overridable_options():
    option = options.register(
        options.GuardOption(name="_decoration_only", validate=lambda v: v, per_call=False)
    )
    try:
        with pytest.raises(TypeError, match="cannot be overridden per call"):
            options.clean({"_decoration_only": 1}, where="apply_async", per_call=True)
        assert options.clean({"_decoration_only": 1}, where="@guarded_task") == {
            "_decoration_only": 1
        }
    finally:
        options._registry.pop(option.name)


def test_registering_a_name_twice_is_an_error():
    with pytest.raises(RuntimeError, match="registered twice"):
        options.register(options.GuardOption(name="priority", validate=str))


def test_precedence_call_over_decorator_over_setting_over_default():
    assert options.resolve("priority", {"priority": "low"}, {"priority": "high"}) == "low"
    assert options.resolve("priority", {}, {"priority": "high"}) == "high"
    with override_settings(CELERY_GUARD_DEFAULT_PRIORITY="low"):
        assert options.resolve("priority", {}, {}) == "low"
    assert options.resolve("priority", {}, {}) == "default"


def test_validation_follows_override_settings():
    with override_settings(CELERY_GUARD_PRIORITY_QUEUES={"urgent": "q-urgent", "default": "q"}):
        assert options.clean({"priority": "urgent"}, where="x") == {"priority": "urgent"}
