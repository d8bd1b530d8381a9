"""Real-service test harness: Celery worker processes, broker queue lengths, waiting."""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import redis
from kombu import Connection

from devprocs.launcher import ROOT, SEARCH_PATH, CeleryProcess, worker_args

#: The ``-A`` app of every Celery process the suite starts.
APP = "tests.celery_app"
#: Logs and screenshots the suite keeps.
ARTIFACTS = ROOT / "test-artifacts"


def wait_until(predicate: Callable[[], Any], timeout: float = 30, interval: float = 0.1) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {predicate}")
        time.sleep(interval)


def suite_env(broker_url: str, db_name: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of a process the suite starts: its settings, broker and test database."""
    return {
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "CELERY_BROKER_URL": broker_url,
        "CG_WORKER_DB_NAME": db_name,
        **(extra or {}),
    }


def process_env(
    broker_url: str, db_name: str, extra: dict[str, str] | None = None
) -> dict[str, str]:
    """The whole environment of a plain subprocess of the suite (``python -m ...``)."""
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(map(str, SEARCH_PATH)),
        **suite_env(broker_url, db_name, extra),
    }


class Worker(CeleryProcess):
    """A ``celery worker`` subprocess of the test app, started and stopped by a test.

    It runs with the suite's settings and test database and consumes ``queues`` from
    ``broker_url``; its log is kept in ``test-artifacts/``.
    """

    def __init__(
        self,
        queues: Iterable[str],
        *,
        broker_url: str,
        db_name: str,
        name: str | None = None,
        concurrency: int = 1,
        pool: str = "prefork",
        extra_env: dict[str, str] | None = None,
        extra_args: Iterable[str] = (),
    ) -> None:
        name = name or f"w{uuid.uuid4().hex[:6]}"
        self.queues = list(queues)
        self.extra_args = list(extra_args)
        self.broker_url = broker_url
        args = worker_args(self.queues, hostname=f"{name}@%h", concurrency=concurrency, pool=pool)
        args += self.extra_args
        super().__init__(
            APP,
            args,
            name=name,
            env=suite_env(broker_url, db_name, extra_env),
            log_path=ARTIFACTS / f"worker-{name}.log",
        )


def queue_length(broker_url: str, queue: str) -> int:
    """Count the messages waiting in ``queue`` on the real broker."""
    if broker_url.startswith(("redis://", "rediss://")):
        client = redis.Redis.from_url(broker_url)
        # Celery's Redis transport spreads priorities over several lists per queue.
        names = [queue, *(f"{queue}\x06\x16{step}" for step in range(1, 10))]
        return int(sum(client.llen(name) for name in names))
    with Connection(broker_url) as conn:
        channel = conn.channel()
        try:
            return int(channel.queue_declare(queue=queue, passive=True).message_count)
        except Exception as exc:  # the queue does not exist: nothing was ever published to it
            if "NOT_FOUND" in str(exc) or "404" in str(exc):
                return 0
            raise
        finally:
            with contextlib.suppress(Exception):
                channel.close()


def purge(broker_url: str, queues: Iterable[str]) -> None:
    """Empty ``queues`` on the broker (queues that do not exist are skipped)."""
    with Connection(broker_url) as conn:
        for queue in queues:
            channel = conn.channel()
            # A queue that was never declared has nothing to purge.
            with contextlib.suppress(Exception):
                channel.queue_purge(queue)
            with contextlib.suppress(Exception):
                channel.close()
