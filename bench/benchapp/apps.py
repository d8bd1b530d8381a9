"""App config of the bench app: the tasks every benchmark case runs."""

from __future__ import annotations

from django.apps import AppConfig


class BenchAppConfig(AppConfig):
    """The bench app (its worker's ready handshake is the launcher's, ``devprocs.launcher``)."""

    name = "bench.benchapp"
    label = "benchapp"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        """Count this process's database commits when the runner asks (``bench.dbcount``)."""
        from bench import dbcount

        dbcount.install()
