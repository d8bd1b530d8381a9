"""Fixtures giving tests real services: broker URLs, the test database, worker processes.

A service whose URL is absent is skipped locally and is a failure when ``CI`` is set, so CI
cannot go green by skipping the integration and acceptance tests. Without ``REDIS_URL`` the
``redis_url`` fixture starts the embedded Redis the settings reserved a port for.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from celery import current_app
from django.conf import settings

from celery_guard import conf as guard_conf
from devprocs.embedded import EmbeddedRedis
from tests.support.harness import Worker, purge

IN_CI = bool(os.environ.get("CI"))


def require(url_var: str) -> str:
    """Return the URL in ``url_var``, or skip (fail in CI) when it is not set."""
    url = os.environ.get(url_var)
    if not url:
        message = f"{url_var} is not set"
        if IN_CI:
            pytest.fail(f"{message}: CI must run every integration test", pytrace=False)
        pytest.skip(message)
    return url


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """The Redis broker: ``REDIS_URL``, or an embedded server started on the settings' port."""
    port = settings.CG_TEST_EMBEDDED_REDIS_PORT
    server = EmbeddedRedis(port) if port else None
    yield str(settings.CELERY_BROKER_URL)
    if server is not None:
        server.stop()


@pytest.fixture(scope="session")
def amqp_url() -> str:
    """The RabbitMQ broker at ``AMQP_URL``."""
    return require("AMQP_URL")


@pytest.fixture(scope="session")
def postgres() -> None:
    """Require the suite to run on PostgreSQL (``DATABASE_URL``)."""
    require("DATABASE_URL")
    if settings.DATABASES["default"]["ENGINE"] != "django.db.backends.postgresql":
        pytest.fail("DATABASE_URL is set but the default database is not PostgreSQL")


@pytest.fixture(scope="session")
def queues() -> dict[str, str]:
    """Priority level -> this run's queue name."""
    return dict(settings.CELERY_GUARD_PRIORITY_QUEUES)


@pytest.fixture(scope="session")
def test_db_name(django_db_setup: None, django_db_blocker: pytest.FixtureRequest) -> str:
    """Name of the test database, for the workers to connect to."""
    from django.db import connection

    return str(connection.settings_dict["NAME"])


@pytest.fixture
def empty_queues(redis_url: str, queues: dict[str, str]) -> Iterator[None]:
    """Start and end the test with this run's queues empty on the Redis broker."""
    names = [*queues.values(), settings.CELERY_TASK_DEFAULT_QUEUE]
    purge(redis_url, names)
    yield
    purge(redis_url, names)


@pytest.fixture
def start_worker(test_db_name: str, redis_url: str, queues: dict[str, str]) -> Iterator:
    """Start worker processes for a test; every one is stopped and the queues purged after."""
    started: list[Worker] = []

    def start(levels_or_queues, *, broker_url: str | None = None, **kwargs) -> Worker:
        names = [queues.get(q, q) for q in levels_or_queues]
        worker = Worker(names, broker_url=broker_url or redis_url, db_name=test_db_name, **kwargs)
        started.append(worker)
        return worker.start()

    yield start
    for worker in started:
        worker.stop()
    for broker in {w.broker_url for w in started} | {redis_url}:
        purge(broker, [*queues.values(), settings.CELERY_TASK_DEFAULT_QUEUE])


@pytest.fixture
def celery_conf():
    """Set Celery config keys for one test, restoring them afterwards."""
    conf = current_app.conf
    saved = {}

    def set_(**values):
        for key, value in values.items():
            saved.setdefault(key, conf.get(key))
            conf[key] = value
        guard_conf.forget()  # values the guard derived from the old configuration

    yield set_
    for key, value in saved.items():
        conf[key] = value
    guard_conf.forget()
