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
