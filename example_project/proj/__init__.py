"""Example Django project using celery_guard."""

from proj.celery import app as celery_app

__all__ = ["celery_app"]
