"""Helpers of the dead-letter tests: rows as the pipeline writes them, users, admin, commands."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import time
import uuid
from typing import Any

import redis
from django.conf import settings
from django.contrib.auth.models import Permission, User
from django.core.management import call_command
from django.urls import reverse

from celery_guard.models import DeadLetter
from tests.support.harness import ROOT, process_env
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


#: URL name of the dead-letter changelist.
CHANGELIST = "admin:celery_guard_deadletter_changelist"


def change_url(row: DeadLetter) -> str:
    """The admin change page of ``row``."""
    return reverse("admin:celery_guard_deadletter_change", args=[row.pk])


def tool_url(name: str, row: DeadLetter) -> str:
    """The admin tool page ``name`` (replay, edit, ...) of ``row``."""
    return reverse(f"admin:celery_guard_deadletter_{name}", args=[row.pk])


def action_names(response: Any) -> list[str]:
    """Names of the changelist actions the response offers."""
    form = response.context["action_form"]  # None when the user may run no action at all
    return [name for name, _ in form.fields["action"].choices] if form else []


def messages_of(response: Any) -> str:
    """The Django messages of the response, joined."""
    return " ".join(str(m) for m in response.context["messages"])


def run_command(*args: str) -> tuple[str, str]:
    """``manage.py celery_guard *args`` in-process (replays as :func:`operator`): (out, err)."""
    out, err = io.StringIO(), io.StringIO()
    if args[:1] == ("replay",) and "--dry-run" not in args:
        args = (*args, "--user", operator().username)
    call_command("celery_guard", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def operator() -> User:
    """The Django user the command's replays are audited under."""
    return User.objects.get_or_create(username="ops")[0]


def replay_process(test_db_name: str, redis_url: str, *args: str) -> subprocess.Popen[str]:
    """``manage.py celery_guard replay *args`` in a process of its own, on the test database."""
    env = process_env(redis_url, test_db_name, {"CELERY_GUARD_LOG_LEVEL": "WARNING"})
    command = [sys.executable, "-m", "django", "celery_guard", "replay", *args]
    command += ["--user", operator().username]
    return subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True)
