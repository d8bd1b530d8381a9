"""Idempotency ledgers: the backend ``CELERY_GUARD_IDEMPOTENCY_BACKEND`` selects."""

from __future__ import annotations

import functools

from celery_guard.conf import guard_settings, memo
from celery_guard.idempotency.ledger.base import Claim, Ledger, NewClaim, Start
from celery_guard.idempotency.ledger.database import DatabaseLedger
from celery_guard.idempotency.ledger.redis import RedisLedger

__all__ = [
    "REDIS_SCHEMES",
    "Claim",
    "DatabaseLedger",
    "Ledger",
    "NewClaim",
    "RedisLedger",
    "Start",
    "get_ledger",
    "redis_url",
    "settings_redis_ledger",
]

REDIS_SCHEMES = ("redis", "rediss", "unix", "valkey", "valkeys")


def redis_url() -> str:
    """The Redis of the ``"redis"`` ledger: its own setting, else a Redis broker's URL.

    Raises:
        ValueError: No ``CELERY_GUARD_IDEMPOTENCY_REDIS_URL`` and the broker is not Redis.
    """
    url = guard_settings.idempotency_redis_url
    if url is not None:
        return url
    from celery import current_app

    broker = current_app.conf.broker_url
    if not isinstance(broker, str) or broker.split(":", 1)[0] not in REDIS_SCHEMES:
        raise ValueError(
            "the 'redis' idempotency ledger needs CELERY_GUARD_IDEMPOTENCY_REDIS_URL when "
            "the broker is not Redis"
        )
    return broker


@functools.lru_cache(maxsize=16)
def redis_ledger(url: str, prefix: str) -> RedisLedger:
    """Return this process's Redis ledger for ``url`` and ``prefix`` (built once).

    One client, so one connection pool, per process: a ledger built per call would open a new
    connection for every enqueue and every run.
    """
    return RedisLedger(url, prefix)


def settings_redis_ledger() -> RedisLedger:
    """The Redis ledger of the settings: what :func:`get_ledger` returns for ``"redis"``.

    Raises:
        ValueError: No ``CELERY_GUARD_IDEMPOTENCY_REDIS_URL`` and the broker is not Redis.
    """
    from celery import current_app

    app = current_app._get_current_object()
    # One look-up per keyed publish, kept with the settings (``override_settings`` empties
    # it): Celery's ``broker_url`` lookup alone would cost more than the rest of it. A broker
    # URL assigned to ``app.conf`` at run time is not seen here; :func:`redis_url` (what
    # ``manage.py check`` calls) still reads it every time.
    return memo(
        ("redis_ledger", app),
        lambda: redis_ledger(redis_url(), guard_settings.idempotency_redis_prefix),
    )


def get_ledger() -> Ledger:
    """Return the ledger ``CELERY_GUARD_IDEMPOTENCY_BACKEND`` selects."""
    backend = guard_settings.idempotency_backend
    if backend == "database":
        return DatabaseLedger()
    if backend == "redis":
        return settings_redis_ledger()
    raise ValueError(
        f"CELERY_GUARD_IDEMPOTENCY_BACKEND must be 'database' or 'redis', got {backend!r}"
    )
