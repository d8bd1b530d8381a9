"""The HR example app of ``make demo``."""

import os
from typing import Any

from django.apps import AppConfig

#: The Redis hash the demo's workers count deferrals in, by the rule and kind that refused.
DEFERRALS_KEY = "demo:deferrals"


class HrConfig(AppConfig):
    """HR application: what the demo's guarded tasks read and write."""

    name = "hr"
    verbose_name = "HR (demo)"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        """In the demo's workers, count the deferrals for the summary (no database here)."""
        if os.environ.get("DEMO_COUNT_DEFERRALS"):
            from celery_guard.observability import events

            events.subscribe(_count_deferral, uid="hr-demo-deferrals")


_redis: dict[int, Any] = {}


def _count_deferral(event: Any, fields: dict[str, Any]) -> None:
    if event.name not in ("throttled", "deferred"):
        return
    import redis
    from django.conf import settings

    client = _redis.get(os.getpid())
    if client is None:
        client = _redis[os.getpid()] = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    limit = str(fields.get("limit", ""))
    client.hincrby(DEFERRALS_KEY, limit.rsplit(":", 1)[-1] if ":" in limit else limit)
