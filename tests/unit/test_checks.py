"""System checks: each id fires when it should and stays silent when it should not."""

import pytest
from celery import current_app
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.test import override_settings

from celery_guard.core import checks as core_checks
from celery_guard.failures import checks as failures_checks
from celery_guard.routing import checks as routing_checks
from tests.support.checks import check_setting_values


def ids(messages):
    return [m.id for m in messages]


def test_w001_unknown_setting_with_suggestion():
    assert core_checks.check_unknown_settings() == []
    with override_settings(CELERY_GUARD_PRIORITY_QUEUE={"high": "h"}):
        [message] = core_checks.check_unknown_settings()
    assert message.id == "celery_guard.W001"
    assert "CELERY_GUARD_PRIORITY_QUEUE" in message.msg
    assert "did you mean 'CELERY_GUARD_PRIORITY_QUEUES'" in message.msg


@pytest.mark.parametrize(
    "bad",
    [
        {"CELERY_GUARD_PRIORITY_QUEUES": ["high"]},
        {"CELERY_GUARD_PRIORITY_QUEUES": {}},
        {"CELERY_GUARD_PRIORITY_QUEUES": {"high": 1}},
        {"CELERY_GUARD_DEFAULT_PRIORITY": "urgent"},
        {"CELERY_GUARD_MAX_PAYLOAD_BYTES": 0},
        {"CELERY_GUARD_MAX_PAYLOAD_BYTES": "1kb"},
        {"CELERY_GUARD_INSTALL_ROUTER": "yes"},
    ],
)
def test_e001_invalid_setting_values(bad):
    assert check_setting_values() == []
    with override_settings(**bad):
        messages = check_setting_values()
    assert ids(messages) == ["celery_guard.E001"]
    assert next(iter(bad)) in messages[0].msg


@pytest.mark.parametrize(
    "config",
    [
        {"accept_content": ["json", "pickle"]},
        {"accept_content": ["application/x-python-serialize"]},
        {"task_serializer": "pickle"},
        {"result_accept_content": ["pickle"]},
    ],
)
def test_e002_pickle(celery_conf, config):
    assert core_checks.check_pickle() == []
    celery_conf(**config)
    assert ids(core_checks.check_pickle()) == ["celery_guard.E002"]


def test_w002_acks_late_without_reject_on_worker_lost(celery_conf):
    assert failures_checks.check_acks_late() == []
    celery_conf(task_acks_late=True, task_reject_on_worker_lost=False)
    assert ids(failures_checks.check_acks_late()) == ["celery_guard.W002"]
    celery_conf(task_acks_late=False)
    assert failures_checks.check_acks_late() == []


def test_w003_visibility_timeout_shorter_than_a_time_limit(celery_conf):
    celery_conf(broker_url="redis://127.0.0.1:6379/0", broker_transport_options={})
    assert failures_checks.check_visibility_timeout() == []
    celery_conf(task_time_limit=7200)
    [message] = failures_checks.check_visibility_timeout()
    assert message.id == "celery_guard.W003"
    assert "3600s" in message.msg and "7200s" in message.msg
    celery_conf(broker_transport_options={"visibility_timeout": 7300})
    assert failures_checks.check_visibility_timeout() == []
    celery_conf(broker_url="amqp://guest@localhost//", broker_transport_options={})
    assert failures_checks.check_visibility_timeout() == []


def test_w003_reads_time_limits_of_guarded_tasks(celery_conf):
    from celery_guard import guarded_task

    celery_conf(
        broker_url="redis://127.0.0.1:6379/0", broker_transport_options={"visibility_timeout": 60}
    )

    @guarded_task(name="tests.checks.long_task", time_limit=120)
    def long_task():
        pass

    try:
        [message] = failures_checks.check_visibility_timeout()
        assert "tests.checks.long_task.time_limit" in message.msg
    finally:
        current_app.tasks.pop("tests.checks.long_task", None)


def test_w004_always_eager(celery_conf):
    assert core_checks.check_always_eager() == []
    celery_conf(task_always_eager=True)
    assert ids(core_checks.check_always_eager()) == ["celery_guard.W004"]


def test_e003_and_w005_undeclared_priority_queues(celery_conf, queues):
    assert (
        routing_checks.check_priority_queues() == []
    )  # no task_queues declared: nothing to compare
    celery_conf(task_queues=[queues["high"], queues["default"], queues["low"]])
    assert routing_checks.check_priority_queues() == []
    celery_conf(task_queues=[queues["high"]], task_create_missing_queues=True)
    [warning] = routing_checks.check_priority_queues()
    assert warning.id == "celery_guard.W005"
    assert queues["low"] in warning.msg and queues["high"] not in warning.msg
    celery_conf(task_create_missing_queues=False)
    assert ids(routing_checks.check_priority_queues()) == ["celery_guard.E003"]


def test_w006_router_disabled_and_not_listed(celery_conf):
    assert routing_checks.check_router() == []
    with override_settings(CELERY_GUARD_INSTALL_ROUTER=False):
        celery_conf(task_routes=())
        assert ids(routing_checks.check_router()) == ["celery_guard.W006"]
        celery_conf(task_routes=("celery_guard.routing.route_task",))
        assert routing_checks.check_router() == []


def test_call_command_check_runs_the_guard_checks(celery_conf, capsys):
    call_command("check")
    with (
        override_settings(CELERY_GUARD_MAX_PAYLOAD_BYTES=-1),
        pytest.raises(SystemCheckError) as exc,
    ):
        call_command("check")
    assert "celery_guard.E001" in str(exc.value)
    celery_conf(task_always_eager=True)
    call_command("check")
    assert "celery_guard.W004" in capsys.readouterr().err


def test_w010_database_connection_reuse(celery_conf):
    assert core_checks.check_db_reuse() == []  # unset: the guard's default applies in workers
    celery_conf(CELERY_DB_REUSE_MAX=500)
    assert core_checks.check_db_reuse() == []
    celery_conf(CELERY_DB_REUSE_MAX=0)
    assert ids(core_checks.check_db_reuse()) == ["celery_guard.W010"]
