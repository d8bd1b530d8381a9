"""Unit level: no database, no broker, no process; a unit test asking for one stops the run.

The check runs at collection, before any fixture could create a database or start a Redis.
"""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

#: Fixtures that reach a service (pytest-django's database ones and the suite's own).
SERVICES = frozenset(
    {
        "db",
        "transactional_db",
        "django_db_setup",
        "live_server",
        "redis_url",
        "amqp_url",
        "postgres",
        "test_db_name",
        "empty_queues",
        "start_worker",
        "idem_backend",
        "idem_store",
    }
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Refuse unit tests that use a service fixture or the ``django_db`` marker."""
    offending = []
    for item in items:
        if not Path(item.path).resolve().is_relative_to(HERE):
            continue
        used = sorted(SERVICES.intersection(getattr(item, "fixturenames", ())))
        if item.get_closest_marker("django_db"):
            used.append("django_db")
        if used:
            offending.append(f"{item.nodeid} ({', '.join(used)})")
    if offending:
        raise pytest.UsageError(
            "unit tests use a service; move them to tests/integration or tests/acceptance:\n  "
            + "\n  ".join(offending)
        )
