"""The Celery app of the test suite, and of the worker and beat processes it starts.

``tests/__init__.py`` imports it, as a Django project's package imports its Celery app, so it
is the current app wherever the test settings are loaded.
"""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")

app = Celery("tests.celery_app")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
