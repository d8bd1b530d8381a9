"""The HR example app of ``make demo``."""

from django.apps import AppConfig


class HrConfig(AppConfig):
    """HR application: what the demo's guarded tasks read and write."""

    name = "hr"
    verbose_name = "HR (demo)"
    default_auto_field = "django.db.models.BigAutoField"
