"""Helpers of the dead-letter queue tests: rows as the failure pipeline writes them, users."""

from __future__ import annotations

import base64
import json
import time
import uuid
from typing import Any

import redis
from django.conf import settings
from django.contrib.auth.models import Permission, User

from celery_guard.models import DeadLetter
from tests.testapp import dlq_tasks

UNTIL_FIXED = dlq_tasks.dlq_until_fixed.name


def dead_letter(label: str = "x", **fields: Any) -> DeadLetter:
    """A dead letter of ``dlq_until_fixed(label)`` in this run's default queue."""
    values: dict[str, Any] = {
        "task_name": UNTIL_FIXED,
        "task_id": str(uuid.uuid4()),
        "queue": settings.CELERY_GUARD_PRIORITY_QUEUES["default"],
        "args": [label],
        "kwargs": {},
        "headers": {
            "celery_guard": {
                "v": 1,
                "first_enqueued_at": time.time() - 60,
                "attempt": 3,
                "priority": "default",
                "consumed": 3,
                "history": [],
            }
        },
        "options": {"priority": 3},
        "reason": DeadLetter.Reason.PERMANENT,
        "exception_class": "celery_guard.exceptions.PermanentError",
        "message": f"{label} is not fixed yet",
        "traceback": "Traceback (most recent call last):\nPermanentError: not fixed",
        "attempts": 3,
        "history": [{"attempt": 1, "error": "celery_guard.exceptions.PermanentError"}],
    }
    values.update(fields)
    row: DeadLetter = DeadLetter.objects.create(**values)
    return row


def staff(username: str, *codenames: str) -> User:
    """A staff user who may view dead letters, plus the given ``celery_guard`` permissions."""
    user = User.objects.create_user(username, password="pw", is_staff=True)
    names = ["view_deadletter", *codenames]
    user.user_permissions.set(
        Permission.objects.filter(content_type__app_label="celery_guard", codename__in=names)
    )
    return user


def published(redis_url: str, queue: str) -> list[tuple[dict[str, Any], list[Any], dict[str, Any]]]:
    """The messages waiting in ``queue`` on Redis, decoded: (headers, args, kwargs)."""
    client = redis.Redis.from_url(redis_url)
    found = []
    # Celery's Redis transport keeps one list per priority step.
    names = [queue, *(f"{queue}\x06\x16{step}" for step in range(1, 10))]
    for raw in (raw for name in names for raw in client.lrange(name, 0, -1)):
        message = json.loads(raw)
        body = json.loads(base64.b64decode(message["body"]))
        found.append((message["headers"], body[0], body[1]))
    return found
