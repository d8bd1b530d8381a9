"""Acceptance level: every test may reach Redis (the broker, the Redis ledger)."""

import pytest


@pytest.fixture(scope="session", autouse=True)
def _redis(redis_url: str) -> None:
    """Start the embedded Redis (when there is no ``REDIS_URL``) before the first test."""
