"""Settings are read lazily through celery_guard.conf and follow override_settings."""

import pytest
from django.conf import settings
from django.test import override_settings

from celery_guard import conf
from celery_guard.conf import guard_settings


def test_defaults_apply_when_the_project_sets_nothing():
    with override_settings():
        del settings.CELERY_GUARD_PRIORITY_QUEUES
        assert guard_settings.priority_queues == {
            "high": "high",
            "default": "default",
            "low": "low",
        }
    assert guard_settings.default_priority == "default"
    assert guard_settings.max_payload_bytes == 256 * 1024
    assert guard_settings.install_router is True


def test_override_settings_is_seen_on_the_next_read():
    with override_settings(CELERY_GUARD_MAX_PAYLOAD_BYTES=10):
        assert guard_settings.max_payload_bytes == 10
    assert guard_settings.max_payload_bytes == 256 * 1024


def test_known_settings_are_the_declared_defaults():
    assert conf.known_settings() == {f"CELERY_GUARD_{name}" for name in conf.DEFAULTS}


def test_a_cached_read_follows_override_settings_in_and_out():
    assert guard_settings.max_payload_bytes == 256 * 1024  # read, and kept
    with override_settings(CELERY_GUARD_MAX_PAYLOAD_BYTES=9):
        assert guard_settings.max_payload_bytes == 9
        with override_settings():
            del settings.CELERY_GUARD_MAX_PAYLOAD_BYTES
            assert guard_settings.max_payload_bytes == 256 * 1024
        assert guard_settings.max_payload_bytes == 9
    assert guard_settings.max_payload_bytes == 256 * 1024
    assert guard_settings.idempotency_start_grace == 300.0
    with override_settings(CELERY_GUARD_IDEMPOTENCY_START_GRACE=5):
        assert guard_settings.idempotency_start_grace == 5.0
    assert guard_settings.idempotency_start_grace == 300.0


def test_memo_keeps_a_value_until_the_settings_change():
    calls = []

    def compute():
        calls.append(1)
        return len(calls)

    assert conf.memo("test_memo", compute) == 1
    assert conf.memo("test_memo", compute) == 1
    with override_settings(CELERY_GUARD_MAX_PAYLOAD_BYTES=10):
        assert conf.memo("test_memo", compute) == 2
    assert conf.memo("test_memo", compute) == 3


def test_memo_keeps_no_value_that_raised():
    def fail():
        raise ValueError("no")

    for _ in range(2):
        with pytest.raises(ValueError):
            conf.memo("test_memo_raises", fail)
