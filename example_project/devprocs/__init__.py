"""Processes the test suite, ``make demo`` and ``make bench`` start: Celery workers, Redis.

Development tooling, not part of the installed ``celery_guard`` package; importable wherever
``example_project/`` is on ``sys.path`` (pytest's ``pythonpath``, ``bench``, ``run_demo.py``).
"""
