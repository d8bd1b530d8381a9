"""Registers the tasks of every bench case (Celery's autodiscovery imports this module)."""

from bench import cases
from bench.benchapp import run_tasks  # noqa: F401  (bench/runs.py)

cases.load_all()
