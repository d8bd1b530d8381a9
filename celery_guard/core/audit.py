"""Admin log entries (``LogEntry``) for what the dead-letter tools change, written in bulk."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from django.apps import apps


def log_changes(user: Any, entries: Iterable[tuple[Any, str]]) -> None:
    """Write one "changed" admin log entry per ``(object, message)`` under ``user``.

    Callers write them in the transaction of the change itself, so a change is in the log
    exactly when it is committed. Nothing is written without a user to name, or when the
    admin app (whose table the log is) is not installed.
    """
    entries = list(entries)
    if user is None or not entries or not apps.is_installed("django.contrib.admin"):
        return
    from django.contrib.admin.models import CHANGE, LogEntry
    from django.contrib.contenttypes.models import ContentType

    LogEntry.objects.bulk_create(
        LogEntry(
            user_id=user.pk,
            content_type_id=ContentType.objects.get_for_model(obj).pk,
            object_id=str(obj.pk),
            object_repr=str(obj)[:200],
            action_flag=CHANGE,
            change_message=message,
        )
        for obj, message in entries
    )
