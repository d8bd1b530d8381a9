"""App config of the bench app: tells the runner when the worker it started consumes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from django.apps import AppConfig

READY_FILE_ENV = "CG_BENCH_READY_FILE"


def _touch_ready_file(sender: Any = None, **kwargs: Any) -> None:
    Path(os.environ[READY_FILE_ENV]).write_text(str(os.getpid()))


class BenchAppConfig(AppConfig):
    """Connects the worker-ready handshake in a worker started by the runner."""

    name = "bench.benchapp"
    label = "benchapp"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        """Connect the handshake (no database access)."""
        if os.environ.get(READY_FILE_ENV):
            from celery import signals

            signals.worker_ready.connect(
                _touch_ready_file, dispatch_uid="benchapp.ready", weak=False
            )
