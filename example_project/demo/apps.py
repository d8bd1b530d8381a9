"""The demo app: a few guarded tasks and the records they write."""

from django.apps import AppConfig


class DemoConfig(AppConfig):
    """Demo application."""

    name = "demo"
    default_auto_field = "django.db.models.BigAutoField"
