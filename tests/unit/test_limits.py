"""Limits: rate strings, option validation at decoration, tenants, rules, system checks."""

from __future__ import annotations

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db import connections
from django.test import override_settings

from celery_guard import guarded_task
from celery_guard.limits import checks as limits_checks
from celery_guard.limits import dbstore, rules, store
from celery_guard.limits.rules import Rate, Rule
from tests.testapp import limit_tasks


@pytest.mark.parametrize(
    ("text", "rate"),
    [("50/s", Rate(50, 1.0)), (" 3 / m ", Rate(3, 60.0)), ("10/h", Rate(10, 3600.0))],
)
def test_rate_strings_parse(text, rate):
    assert rules.parse_rate(text) == rate


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        ("0/s", ValueError),
        ("5/d", ValueError),
        ("5", ValueError),
        ("x/s", ValueError),
        ("-1/s", ValueError),
        (5, TypeError),
        (None, TypeError),
    ],
)
def test_bad_rate_strings_are_refused(bad, error):
    with pytest.raises(error):
        rules.parse_rate(bad)


def test_rate_prints_as_written():
    assert str(rules.parse_rate("50/s")) == "50/s"


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        (
            {"concurrencyy": 2},
            TypeError,
            "unknown option 'concurrencyy' (did you mean 'concurrency'?)",
        ),
        ({"rate": "5/d"}, ValueError, "@guarded_task option 'rate': '5/d' is not a rate"),
        ({"rate": 5}, TypeError, "@guarded_task option 'rate'"),
        ({"concurrency": 0}, ValueError, "@guarded_task option 'concurrency': must be at least 1"),
        ({"concurrency": True}, TypeError, "@guarded_task option 'concurrency'"),
        ({"limits": "test-gateway"}, TypeError, "@guarded_task option 'limits'"),
        (
            {"limits": ["test-gatewya"]},
            ValueError,
            "@guarded_task option 'limits': unknown limit 'test-gatewya' "
            "(did you mean 'test-gateway'?)",
        ),
        (
            {"tenant_rate": "1/s"},
            ValueError,
            "@guarded_task option 'tenant_rate': needs a 'tenant'",
        ),
        ({"tenant_concurrency": 1}, ValueError, "option 'tenant_concurrency': needs a 'tenant'"),
        (
            {"tenant": "{departmnt}"},
            ValueError,
            "@guarded_task option 'tenant': template '{departmnt}' uses 'departmnt', which is "
            "not a parameter",
        ),
    ],
)
def test_bad_options_fail_at_decoration_naming_the_option(options, error, message):
    with pytest.raises(error) as exc:

        @guarded_task(**options)
        def notify(department: int) -> None: ...

    assert message in str(exc.value)


def test_limits_may_not_be_lifted_per_call():
    with pytest.raises(TypeError, match="'concurrency' cannot be overridden per call"):
        limit_tasks.limited_job.apply_async(("x",), guard={"concurrency": 100})


def test_tenant_is_rendered_from_the_arguments_or_given_per_call():
    task = limit_tasks.tenant_job
    assert rules.tenant_of(task, (7, "a"), {}, {}) == "dept-7"
    assert rules.tenant_of(task, (), {"department_id": 8, "label": "a"}, {}) == "dept-8"
    assert rules.tenant_of(task, (7, "a"), {}, {"tenant": "acme"}) == "acme"
    assert rules.tenant_of(limit_tasks.limited_job, ("a",), {}, {}) is None
    with pytest.raises(ValueError, match=r"cannot derive the tenant: template .* no value"):
        rules.tenant_of(task, (None, "a"), {}, {})
    long = rules.tenant_of(task, (), {"department_id": "x" * 300, "label": "a"}, {})
    assert long.startswith("#") and len(long) == 65


def test_rules_of_a_run():
    assert rules.rules_for(limit_tasks.limited_job, None) == [
        Rule(f"task:{limit_tasks.limited_job.name}", 1, None)
    ]
    # A policy's overrides replace the task's own limits (or give a task some).
    assert rules.rules_for(limit_tasks.pausable_job, None, rate=Rate(5, 1.0)) == [
        Rule(f"task:{limit_tasks.pausable_job.name}", None, Rate(5, 1.0))
    ]
    assert rules.rules_for(limit_tasks.gateway_job, None) == [
        Rule("limit:test-gateway", 1, Rate(1000, 1.0))
    ]
    tenant = limit_tasks.tenant_job
    assert rules.rules_for(tenant, "dept-7") == [Rule(f"tenant:{tenant.name}:dept-7", 1, None)]
    assert rules.rules_for(tenant, None) == []
    with override_settings(CELERY_GUARD_LIMITS={}), pytest.raises(ImproperlyConfigured):
        rules.rules_for(limit_tasks.gateway_job, None)


@pytest.mark.parametrize(
    "bad",
    [["mail"], {"mail": "50/s"}, {"mail": {}}, {"mail": {"rat": "5/s"}}, {"": {"rate": "5/s"}}],
)
def test_e008_malformed_limits_setting(bad):
    with override_settings(CELERY_GUARD_LIMITS=bad):
        [message] = limits_checks.check_limits_setting()
    assert message.id == "celery_guard.E008"


@pytest.mark.parametrize(
    "bad", [{"rate": "fast"}, {"rate": "0/s"}, {"concurrency": 0}, {"concurrency": "3"}]
)
def test_e009_bad_rate_or_concurrency_in_a_named_limit(bad):
    assert limits_checks.check_limits_setting() == []
    with override_settings(CELERY_GUARD_LIMITS={"mail": bad}):
        [message] = limits_checks.check_limits_setting()
    assert message.id == "celery_guard.E009"
    assert "CELERY_GUARD_LIMITS['mail']" in message.msg


def test_e001_limits_settings():
    assert limits_checks.check_setting_values() == []
    with override_settings(
        CELERY_GUARD_LIMITS_ON_OUTAGE="maybe",
        CELERY_GUARD_LIMITS_LEASE=0,
        CELERY_GUARD_LIMITS_BACKEND="memcached",
    ):
        found = limits_checks.check_setting_values()
    assert {m.id for m in found} == {"celery_guard.E001"} and len(found) == 3
    assert any("CELERY_GUARD_LIMITS_BACKEND" in m.msg for m in found)


def test_the_backend_is_redis_when_there_is_one_else_the_database(celery_conf):
    with override_settings(CELERY_GUARD_LIMITS_BACKEND=None):
        assert store.backend() == "redis"  # CELERY_GUARD_LIMITS_REDIS_URL is set
        celery_conf(broker_url="amqp://guest:guest@127.0.0.1:5672//")
        with override_settings(CELERY_GUARD_LIMITS_REDIS_URL=None):
            assert store.backend() == "database"  # no Redis anywhere: the embedded default
            assert isinstance(store.get_store(), dbstore.DatabaseStore)
        celery_conf(broker_url="redis://127.0.0.1:6379/0")
        with override_settings(CELERY_GUARD_LIMITS_REDIS_URL=None):
            assert store.backend() == "redis"  # a Redis broker
    with override_settings(CELERY_GUARD_LIMITS_BACKEND="database"):
        assert store.backend() == "database"  # the setting wins
    with override_settings(CELERY_GUARD_LIMITS_BACKEND="memcached"), pytest.raises(ValueError):
        store.get_store()


def test_w012_a_task_names_an_undefined_limit():
    assert limits_checks.check_unknown_limits() == []
    with override_settings(CELERY_GUARD_LIMITS={"other": {"rate": "1/s"}}):
        [message] = limits_checks.check_unknown_limits()
    assert message.id == "celery_guard.W012"
    assert "'test-gateway'" in message.msg


def test_w013_celery_rate_limit_on_a_guarded_task(monkeypatch):
    assert limits_checks.check_celery_rate_limit() == []
    monkeypatch.setattr(limit_tasks.pausable_job, "rate_limit", "10/s")
    [message] = limits_checks.check_celery_rate_limit()
    assert message.id == "celery_guard.W013"
    assert "rate=" in message.hint


def test_w014_prefetch_multiplier_with_limits(celery_conf):
    assert limits_checks.check_prefetch() == []
    celery_conf(worker_prefetch_multiplier=4)
    [message] = limits_checks.check_prefetch()
    assert message.id == "celery_guard.W014"


def test_w015_the_redis_backend_without_a_redis(celery_conf):
    assert limits_checks.check_store() == []
    celery_conf(broker_url="amqp://guest:guest@127.0.0.1:5672//")
    with override_settings(CELERY_GUARD_LIMITS_REDIS_URL=None, CELERY_GUARD_LIMITS_BACKEND=None):
        assert limits_checks.check_store() == []  # chosen automatically: the database
    with override_settings(CELERY_GUARD_LIMITS_REDIS_URL=None, CELERY_GUARD_LIMITS_BACKEND="redis"):
        [message] = limits_checks.check_store()
    assert message.id == "celery_guard.W015"


def test_w029_the_database_backend_above_read_committed(monkeypatch):
    db = connections["default"].settings_dict
    monkeypatch.setitem(db, "ENGINE", "django.db.backends.postgresql")
    monkeypatch.setitem(db, "OPTIONS", {**db.get("OPTIONS", {}), "isolation_level": 1})
    with override_settings(CELERY_GUARD_LIMITS_BACKEND="database"):
        assert limits_checks.check_database_isolation() == []  # READ COMMITTED
        monkeypatch.setitem(db["OPTIONS"], "isolation_level", 2)  # REPEATABLE READ
        [message] = limits_checks.check_database_isolation()
    assert message.id == "celery_guard.W029"
    with override_settings(CELERY_GUARD_LIMITS_BACKEND="redis"):
        assert limits_checks.check_database_isolation() == []


def test_w022_a_named_limit_no_task_uses():
    assert limits_checks.check_unused_limits() == []
    limits = {"test-gateway": {"concurrency": 1}, "spare": {"rate": "1/s"}}
    with override_settings(CELERY_GUARD_LIMITS=limits):
        [message] = limits_checks.check_unused_limits()
    assert message.id == "celery_guard.W022"
    assert "'spare'" in message.msg


def test_the_tenant_is_stamped_at_enqueue_and_kept_by_a_republish():
    task = limit_tasks.tenant_job
    assert task.guard_prepare((7, "a"), {}, None)["tenant"] == "dept-7"
    assert task.guard_prepare((7, "a"), {}, {"tenant": "acme"})["tenant"] == "acme"
    # A retry or a deferral republishes with the header it carries.
    assert task.guard_prepare((8, "a"), {}, None, inherited={"tenant": "dept-7"})["tenant"] == (
        "dept-7"
    )
    assert limit_tasks.limited_job.guard_prepare(("a",), {}, None)["tenant"] is None
    with pytest.raises(ValueError, match="cannot derive the tenant"):
        task.guard_prepare((), {"label": "a", "department_id": ""}, None)
