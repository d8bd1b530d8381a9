"""Worker database connections: kept across tasks by default, replaced once unusable.

Celery's Django fixup closes every database connection before and after each task unless
``CELERY_DB_REUSE_MAX`` is set: a task that touches the database (the database idempotency
ledger, dead letters, the project's own queries) then opens a new connection every time, a
new PostgreSQL server process per task. A project that sets nothing gets
:data:`DEFAULT_DB_REUSE_MAX` from the guard; one that sets ``CELERY_DB_REUSE_MAX`` (also to 0,
Celery's per-task behaviour) keeps its value. Either way a connection that errored and no
longer works, or that a task left with autocommit changed, is closed after the task, so the
next one opens a fresh connection: Django's end-of-request rule, without the age limit of
``CONN_MAX_AGE = 0`` (which would close every connection again).
"""

from __future__ import annotations

import logging
from typing import Any

from django.db import connections

logger = logging.getLogger(__name__)

#: Tasks a worker process runs between two closes of its connections, unless the project sets
#: ``CELERY_DB_REUSE_MAX`` itself (Celery's fixup closes them every 2 x this many task starts
#: and ends).
DEFAULT_DB_REUSE_MAX = 1000


def apply_default(app: Any) -> int | None:
    """Give the Django worker fixup of ``app`` the default reuse count if the project set none.

    Returns:
        The reuse count in effect, or None when ``app`` has no Django worker fixup.
    """
    configured = app.conf.get("CELERY_DB_REUSE_MAX")
    # The fixup read the setting when the worker started importing modules, before Django (and
    # so this app) was set up: the value is handed to that fixup, Celery's only reader of it.
    for fixup in getattr(app, "_fixups", ()):
        worker_fixup = getattr(fixup, "worker_fixup", None)
        if worker_fixup is None or not hasattr(worker_fixup, "db_reuse_max"):
            continue
        if configured is None:
            app.conf.CELERY_DB_REUSE_MAX = DEFAULT_DB_REUSE_MAX
            worker_fixup.db_reuse_max = DEFAULT_DB_REUSE_MAX
        reuse: int = worker_fixup.db_reuse_max or 0
        logger.debug("celery_guard: worker database connections reused for %s tasks", reuse)
        return reuse
    return None


def on_worker_init(sender: Any = None, **kwargs: Any) -> None:
    """``worker_init`` receiver: apply the default to the starting worker's app."""
    app = getattr(sender, "app", None)
    if app is None:
        return
    try:
        apply_default(app)
    except Exception:  # a Celery whose fixup changed shape: keep its own behaviour
        logger.exception("celery_guard: could not set the default of CELERY_DB_REUSE_MAX")


def close_unusable(**kwargs: Any) -> None:
    """Close the connections that must not serve the next query (errored and unusable).

    The ``task_postrun`` receiver, and what the failure pipeline calls after a database error
    (the worker's main process too, which no task boundary ever cleans). No round trip
    unless a database error happened (then one ``is_usable`` probe).
    """
    for connection in connections.all(initialized_only=True):
        if connection.connection is None or connection.in_atomic_block:
            continue
        if not connection.settings_dict.get("CONN_MAX_AGE"):
            # CONN_MAX_AGE = 0 means "per request"; a worker has no requests, and the fixup's
            # reuse count bounds a connection's life instead.
            connection.close_at = None
        connection.close_if_unusable_or_obsolete()
