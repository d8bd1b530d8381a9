"""Rows the read-only admin pages show (beat lease, outbox), for the admin and browser tests."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from celery_guard.models import BeatLease, OutboxMessage


def leader_lease(name: str = "prod-eu", holder: str = "host-a:42:abc", token: int = 7) -> BeatLease:
    """A live beat lease, acquired an hour ago and renewed now."""
    now = datetime.now(timezone.utc)
    return BeatLease.objects.create(
        name=name,
        holder=holder,
        token=token,
        acquired_at=now - timedelta(hours=1),
        renewed_at=now,
        expires_at=now + timedelta(seconds=30),
    )


def outbox_row(task_id: str, *, age: float = 300, **fields: Any) -> OutboxMessage:
    """An outbox row of ``app.tasks.send_receipt`` created ``age`` seconds ago, due now."""
    now = datetime.now(timezone.utc)
    values: dict[str, Any] = {
        "task_name": "app.tasks.send_receipt",
        "created_at": now - timedelta(seconds=age),
        "due_at": now,
        **fields,
    }
    return OutboxMessage.objects.create(task_id=task_id, **values)
