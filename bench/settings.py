"""Django settings of the benchmark: the example project plus the bench app, isolated per run.

The runner exports ``CG_BENCH_RUN_ID``, ``CG_BENCH_BROKER_URL`` and ``DATABASE_URL`` (or
``SQLITE_PATH``) before Django starts, in its own process and in the worker it starts, so
both sides see the same Celery configuration. Every key the run puts into Redis carries the
run id (a global key prefix), so a shared Redis is left as it was found.
"""

import copy
import os
from typing import Any, cast

from bench import naming
from proj.settings import *  # noqa: F403
from proj.settings import INSTALLED_APPS
from proj.settings import LOGGING as _PROJECT_LOGGING

CG_BENCH_PREFIX = naming.prefix()

# The example project runs with DEBUG for its admin; a production worker does not (with DEBUG,
# Django records every SQL statement of a process, a cost per query on the guarded side).
DEBUG = False

INSTALLED_APPS = [*INSTALLED_APPS, "bench.benchapp"]

# Identical for plain and guarded tasks: the guard's own defaults (late acks, requeue when
# the worker process dies, JSON), results ignored, one message prefetched per process,
# no events.
CELERY_BROKER_URL = os.environ.get("CG_BENCH_BROKER_URL", "redis://127.0.0.1:6379/0")
_transport: dict[str, Any] = {
    "visibility_timeout": 3600,
    "global_keyprefix": f"{CG_BENCH_PREFIX}:",
}
CELERY_BROKER_TRANSPORT_OPTIONS = _transport
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_IGNORE_RESULT = True
CELERY_RESULT_BACKEND = None
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_WORKER_SEND_TASK_EVENTS = False
CELERY_TASK_SEND_SENT_EVENT = False
CELERY_TASK_DEFAULT_QUEUE = f"{CG_BENCH_PREFIX}-celery"
CELERY_GUARD_PRIORITY_QUEUES = {
    level: f"{CG_BENCH_PREFIX}-{level}" for level in ("high", "default", "low")
}
CELERY_WORKER_HIJACK_ROOT_LOGGER = False

# The guard logs every guarded task start at INFO; a production deployment chooses its level,
# and the benchmark measures the guard's work, not the speed of a console handler.
_logging = cast(dict[str, Any], copy.deepcopy(_PROJECT_LOGGING))
_logging["loggers"]["celery_guard"]["level"] = os.environ.get("CELERY_GUARD_LOG_LEVEL", "WARNING")
LOGGING = _logging

# The Redis idempotency ledger writes under the run's prefix, so the run's cleanup finds it.
CELERY_GUARD_IDEMPOTENCY_REDIS_PREFIX = f"{CG_BENCH_PREFIX}:idem:"

# A second database, SQLite, for the "database ledger on SQLite" case when the run's database
# is PostgreSQL (bench/cases/idempotency.py); the runner makes and removes the file.
if os.environ.get(naming.LEDGER_SQLITE_ENV):
    DATABASES = {
        **DATABASES,  # noqa: F405
        naming.LEDGER_SQLITE_ALIAS: {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": os.environ[naming.LEDGER_SQLITE_ENV],
            "OPTIONS": {
                "timeout": 30,
                "transaction_mode": "IMMEDIATE",
                "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
            },
        },
    }

# Two configurations are measured side by side (bench/runner.py), each on a worker of its own:
# "quick start", a project that sets nothing beyond the README's quick start (no
# CELERY_DB_REUSE_MAX: the guard's default applies, celery_guard.dbreuse), and "tuned", which
# sets CELERY_DB_REUSE_MAX itself (CG_BENCH_DB_REUSE_MAX, 1000 unless given; 0 is Celery's
# per-task connections). The runner's own process sets none.
if os.environ.get("CG_BENCH_DB_REUSE_MAX"):
    CELERY_DB_REUSE_MAX = int(os.environ["CG_BENCH_DB_REUSE_MAX"])
