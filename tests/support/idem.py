"""Fixtures shared by the idempotency tests: the ledger backend, parametrized."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
import redis
from django.conf import settings
from django.test import override_settings

from celery_guard.idempotency import ledger

BACKENDS = ["database", "redis"]


def redis_keys(prefix: str) -> list[bytes]:
    """Every key of the Redis ledger under ``prefix`` (this test's only)."""
    client = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    return list(client.scan_iter(match=prefix + "*", count=1000))


@pytest.fixture(params=BACKENDS)
def idem_backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run the test once per ledger backend; the Redis one under a prefix of its own.

    The environment variables carry the choice to the processes the test starts.
    """
    name = request.param
    prefix = f"cgt-{os.environ['CG_TEST_RUN_ID']}:idem:{uuid.uuid4().hex[:8]}:"
    env = {"CG_IDEMPOTENCY_BACKEND": name, "CG_IDEMPOTENCY_REDIS_PREFIX": prefix}
    with override_settings(
        CELERY_GUARD_IDEMPOTENCY_BACKEND=name, CELERY_GUARD_IDEMPOTENCY_REDIS_PREFIX=prefix
    ):
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            yield name
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            keys = redis_keys(prefix)
            if keys:
                redis.Redis.from_url(settings.CELERY_BROKER_URL).delete(*keys)


@pytest.fixture
def idem_store(idem_backend: str) -> ledger.Ledger:
    """The ledger of the current backend."""
    return ledger.get_ledger()
