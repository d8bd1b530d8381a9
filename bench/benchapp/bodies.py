"""Task bodies shared by every variant, so the variants differ only in how they are declared."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import redis

BROKER_ENV = "CG_BENCH_BROKER_URL"
_client: tuple[int, redis.Redis] | None = None


def _redis() -> redis.Redis:
    # One client per process: prefork children must not share the parent's socket.
    global _client
    if _client is None or _client[0] != os.getpid():
        _client = (os.getpid(), redis.Redis.from_url(os.environ[BROKER_ENV]))
    return _client[1]


# Every body takes ``ident`` last: a number unique within the run (for idempotency keys).


def noop(ident: int) -> None:
    """Do nothing: the run measures the framework alone."""


def sleep(ident: int) -> None:
    """Wait 10 ms, like a task that calls a fast service."""
    time.sleep(0.01)


def stamp(key: str, sent: float, ident: int) -> None:
    """Record how long after ``sent`` (wall clock) this run started, into the list ``key``."""
    started = time.time()
    _redis().rpush(key, started - sent)


def count(key: str) -> None:
    """Count one finished run into the Redis counter ``key`` (drains that wait for a total)."""
    _redis().incr(key)


KINDS: dict[str, Callable[..., Any]] = {"noop": noop, "sleep": sleep, "stamp": stamp}
