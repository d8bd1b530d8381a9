"""Test app: tasks that record their executions, and the worker-ready handshake."""

import os
from pathlib import Path

from django.apps import AppConfig


def _touch_ready_file(sender=None, **kwargs):
    Path(os.environ["CG_READY_FILE"]).write_text(str(os.getpid()))


class TestAppConfig(AppConfig):
    """Connects the handshake that tells the suite a worker it started is consuming."""

    name = "tests.testapp"
    label = "testapp"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self):
        if os.environ.get("CG_READY_FILE"):
            from celery import signals

            signals.worker_ready.connect(
                _touch_ready_file, dispatch_uid="testapp.ready", weak=False
            )
            signals.beat_init.connect(
                _touch_ready_file, dispatch_uid="testapp.beat_ready", weak=False
            )
