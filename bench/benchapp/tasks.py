"""Registers the tasks of every bench case (Celery's autodiscovery imports this module)."""

from bench import cases

cases.load_all()
