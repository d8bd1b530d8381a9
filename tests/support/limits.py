"""Fixtures shared by the limits tests: the limits store's backend, parametrized."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from django.conf import settings
from django.test import override_settings

from celery_guard.limits import dbstore, store

BACKENDS = ["redis", "database"]


@pytest.fixture(params=BACKENDS)
def limits_backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run the test once per limits store (the test commits: ``django_db(transaction=True)``).

    ``CG_LIMITS_BACKEND`` carries the choice to the workers the test starts. The database
    variant of an acceptance test (real workers, several connections) needs PostgreSQL: the
    suite's time goes to the engine the multi-worker claims are made for.
    """
    name = request.param
    if name == "database":
        marker = request.node.get_closest_marker("django_db")
        if marker is None or not marker.kwargs.get("transaction"):
            pytest.fail("a limits_backend test needs @pytest.mark.django_db(transaction=True)")
        if request.node.get_closest_marker("acceptance"):
            request.getfixturevalue("postgres")
    saved = os.environ.get("CG_LIMITS_BACKEND")
    os.environ["CG_LIMITS_BACKEND"] = name
    try:
        with override_settings(CELERY_GUARD_LIMITS_BACKEND=name):
            yield name
    finally:
        if saved is None:
            os.environ.pop("CG_LIMITS_BACKEND", None)
        else:
            os.environ["CG_LIMITS_BACKEND"] = saved


def new_store(backend: str) -> store.LimitsStore:
    """A store of ``backend`` of its own: a fresh Redis prefix, or the test's database."""
    if backend == "redis":
        return store.Store(settings.CELERY_GUARD_LIMITS_REDIS_URL, fresh_prefix())
    return dbstore.DatabaseStore()


def fresh_prefix() -> str:
    """A Redis key prefix no other test uses."""
    return f"cgt-{os.environ['CG_TEST_RUN_ID']}:limits:{uuid.uuid4().hex[:8]}:"


@pytest.fixture
def limits_store(limits_backend: str) -> store.LimitsStore:
    """A fresh store of the current backend."""
    return new_store(limits_backend)
