"""Django application configuration for celery_guard."""

from __future__ import annotations

from django.apps import AppConfig
from django.core import checks


class CeleryGuardConfig(AppConfig):
    """Registers the system checks and connects the Celery signal receivers (no DB access)."""

    name = "celery_guard"
    verbose_name = "Celery guard"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        """Register checks and receivers."""
        from celery_guard import checks as guard_checks
        from celery_guard import receivers

        for check in guard_checks.ALL:
            checks.register(check, "celery_guard")
        receivers.connect()
