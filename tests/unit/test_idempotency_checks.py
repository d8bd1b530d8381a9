"""System checks of the idempotency feature: E001 for its settings, W007 for short windows."""

import contextlib
from datetime import timedelta

import pytest
from celery import current_app
from django.test import override_settings

from celery_guard import guarded_task
from celery_guard.idempotency import checks as idempotency_checks
from tests.support.checks import check_setting_values


@pytest.mark.parametrize(
    "bad",
    [
        {"CELERY_GUARD_IDEMPOTENCY_BACKEND": "memcached"},
        {"CELERY_GUARD_IDEMPOTENCY_REDIS_URL": "amqp://localhost//"},
        {"CELERY_GUARD_IDEMPOTENCY_REDIS_PREFIX": None},
        {"CELERY_GUARD_DEDUP_WINDOW": 0},
        {"CELERY_GUARD_IDEMPOTENCY_LEASE": "10m"},
        {"CELERY_GUARD_IDEMPOTENCY_PUBLISH_GRACE": 0},
        {"CELERY_GUARD_IDEMPOTENCY_PUBLISH_GRACE": None},
        {"CELERY_GUARD_IDEMPOTENCY_START_GRACE": -1},
        {"CELERY_GUARD_IDEMPOTENCY_RETENTION": timedelta(0)},
        {"CELERY_GUARD_RELEASE_ON_DEAD_LETTER": "yes"},
    ],
)
def test_e001_invalid_idempotency_settings(bad):
    assert check_setting_values() == []
    with override_settings(**bad):
        [message] = check_setting_values()
    assert message.id == "celery_guard.E001"
    assert next(iter(bad)) in message.msg


def test_e001_accepts_timedeltas_and_redis_urls():
    with override_settings(
        CELERY_GUARD_DEDUP_WINDOW=timedelta(hours=2),
        CELERY_GUARD_IDEMPOTENCY_PUBLISH_GRACE=timedelta(seconds=30),
        CELERY_GUARD_IDEMPOTENCY_REDIS_URL="redis://127.0.0.1:6379/3",
        CELERY_GUARD_IDEMPOTENCY_BACKEND="redis",
    ):
        assert check_setting_values() == []


@contextlib.contextmanager
def amqp_broker():
    """The Celery app's broker is RabbitMQ inside the block."""
    conf = current_app.conf
    saved = conf.broker_url
    conf.broker_url = "amqp://guest@localhost//"
    try:
        yield
    finally:
        conf.broker_url = saved


@pytest.fixture
def short_window_task():
    @guarded_task(name="idem_checks.short", idempotency_key="k:{n}", dedup_window=60)
    def short(n: int) -> None: ...

    assert short.name in current_app.tasks
    yield short
    current_app.tasks.pop(short.name, None)


def test_w007_window_not_longer_than_the_visibility_timeout(short_window_task):
    conf = current_app.conf
    saved = conf.broker_transport_options
    try:
        conf.broker_transport_options = {"visibility_timeout": 30}
        assert idempotency_checks.check_dedup_window() == []
        conf.broker_transport_options = {"visibility_timeout": 60}
        [message] = idempotency_checks.check_dedup_window()
        assert message.id == "celery_guard.W007"
        assert "idem_checks.short (60s)" in message.msg
        with amqp_broker():
            assert idempotency_checks.check_dedup_window() == []
    finally:
        conf.broker_transport_options = saved


def test_e004_redis_ledger_without_a_redis():
    conf = current_app.conf
    saved = conf.broker_url
    try:
        with override_settings(
            CELERY_GUARD_IDEMPOTENCY_BACKEND="redis", CELERY_GUARD_IDEMPOTENCY_REDIS_URL=None
        ):
            assert idempotency_checks.check_idempotency_redis() == []  # the Redis broker is used
            conf.broker_url = "amqp://guest@localhost//"
            [message] = idempotency_checks.check_idempotency_redis()
            assert message.id == "celery_guard.E004"
            assert "CELERY_GUARD_IDEMPOTENCY_REDIS_URL" in message.msg
        assert (
            idempotency_checks.check_idempotency_redis() == []
        )  # the database ledger needs no Redis
        with override_settings(
            CELERY_GUARD_IDEMPOTENCY_BACKEND="redis",
            CELERY_GUARD_IDEMPOTENCY_REDIS_URL="redis://127.0.0.1:6379/1",
        ):
            assert idempotency_checks.check_idempotency_redis() == []
    finally:
        conf.broker_url = saved


def test_w011_lease_not_shorter_than_the_visibility_timeout():
    @guarded_task(name="idem_checks.leased", idempotency_key="k:{n}", time_limit=900)
    def leased(n: int) -> None: ...

    conf = current_app.conf
    saved = conf.broker_transport_options
    try:
        conf.broker_transport_options = {"visibility_timeout": 3600}
        assert idempotency_checks.check_lease_visibility() == []
        conf.broker_transport_options = {"visibility_timeout": 120}
        with override_settings(CELERY_GUARD_IDEMPOTENCY_LEASE=60):
            [message] = idempotency_checks.check_lease_visibility()
        assert message.id == "celery_guard.W011"
        assert "idem_checks.leased (900s)" in message.msg
        with amqp_broker():
            assert idempotency_checks.check_lease_visibility() == []
    finally:
        conf.broker_transport_options = saved
        current_app.tasks.pop(leased.name, None)
