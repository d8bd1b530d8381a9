"""Test app: tasks that record their executions."""

from django.apps import AppConfig


class TestAppConfig(AppConfig):
    """The app of the test tasks (a worker's ready handshake is ``devprocs.launcher``'s)."""

    name = "tests.testapp"
    label = "testapp"
    default_auto_field = "django.db.models.BigAutoField"
