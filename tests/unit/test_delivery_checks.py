"""System checks of the delivery feature: E001 for its settings, E011, W020, W021."""

import pytest
from django.test import override_settings

from celery_guard.delivery import checks as delivery_checks
from tests.support.checks import check_setting_values


@pytest.mark.parametrize(
    "bad",
    [
        {"CELERY_GUARD_OUTBOX": "yes"},
        {"CELERY_GUARD_OUTBOX_FAST_PATH": 1},
        {"CELERY_GUARD_SCHEDULE": "memory"},
        {"CELERY_GUARD_DELIVERY_POLL_INTERVAL": 0},
        {"CELERY_GUARD_DELIVERY_BATCH": 0},
        {"CELERY_GUARD_OUTBOX_RETENTION": "7d"},
    ],
)
def test_e001_invalid_delivery_settings(bad):
    assert check_setting_values() == []
    with override_settings(**bad):
        [message] = check_setting_values()
    assert message.id == "celery_guard.E001"
    assert next(iter(bad)) in message.msg


def test_e011_redis_schedule_needs_a_redis_broker(celery_conf):
    celery_conf(broker_url="amqp://guest:guest@127.0.0.1:5672//")
    with override_settings(CELERY_GUARD_SCHEDULE="redis"):
        [message] = delivery_checks.check_redis_schedule()
    assert message.id == "celery_guard.E011"
    with override_settings(CELERY_GUARD_SCHEDULE="auto"):
        assert delivery_checks.check_redis_schedule() == []


def test_w020_poller_off_while_the_schedule_is_used():
    assert delivery_checks.check_poller() == []
    with override_settings(CELERY_GUARD_DELIVERY_POLLER=False):
        [message] = delivery_checks.check_poller()
    assert message.id == "celery_guard.W020"


def test_w021_global_keyprefix_with_the_redis_schedule(celery_conf):
    celery_conf(broker_url="redis://127.0.0.1:6379/0")
    assert delivery_checks.check_key_prefix() == []
    celery_conf(broker_transport_options={"global_keyprefix": "app:"})
    [message] = delivery_checks.check_key_prefix()
    assert message.id == "celery_guard.W021"
    with override_settings(CELERY_GUARD_SCHEDULE="database"):
        assert delivery_checks.check_key_prefix() == []
