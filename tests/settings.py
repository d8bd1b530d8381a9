"""Settings of the test suite: the example project plus the test app, isolated per run.

Every run gets a run id (inherited by the worker processes it starts) that prefixes its
queue names and names its test database, so two runs on one machine share no state.
Without ``REDIS_URL`` the run starts an embedded ``redis-server`` of its own.
"""

import os
import tempfile
import uuid

from devprocs.embedded import ensure_redis_url
from proj.settings import *  # noqa: F403
from proj.settings import DATABASES, INSTALLED_APPS

RUN_ID = os.environ.setdefault("CG_TEST_RUN_ID", uuid.uuid4().hex[:8])
REDIS_URL, _EMBEDDED_REDIS = ensure_redis_url()

INSTALLED_APPS = [*INSTALLED_APPS, "tests.testapp"]

CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL") or REDIS_URL
CELERY_TASK_DEFAULT_QUEUE = f"cgt-{RUN_ID}-celery"
CELERY_GUARD_PRIORITY_QUEUES = {
    level: f"cgt-{RUN_ID}-{level}" for level in ("high", "default", "low")
}
CELERY_WORKER_HIJACK_ROOT_LOGGER = False

_db = DATABASES["default"]
if _db["ENGINE"].endswith("sqlite3"):
    _db["TEST"] = {"NAME": os.path.join(tempfile.gettempdir(), f"cgt-{RUN_ID}.sqlite3")}
else:
    _db["TEST"] = {"NAME": f"test_celery_guard_{RUN_ID}"}
# A worker started by the suite connects to the test database the suite created.
if os.environ.get("CG_WORKER_DB_NAME"):
    _db["NAME"] = os.environ["CG_WORKER_DB_NAME"]
# Beat processes started by the suite: a short lease, and a connection name to find them by.
CELERY_GUARD_BEAT_LOCK_NAME = f"cgt-{RUN_ID}"
if os.environ.get("CG_BEAT_LEASE_SECONDS"):
    CELERY_GUARD_BEAT_LEASE_SECONDS = float(os.environ["CG_BEAT_LEASE_SECONDS"])
if os.environ.get("CG_DB_APPLICATION_NAME") and _db["ENGINE"].endswith("postgresql"):
    _db.setdefault("OPTIONS", {})["application_name"] = os.environ["CG_DB_APPLICATION_NAME"]

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

# Worker fixtures shorten Redis's redelivery delay to test crashes (extra_env).
if os.environ.get("CG_VISIBILITY_TIMEOUT"):
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "visibility_timeout": float(os.environ["CG_VISIBILITY_TIMEOUT"])
    }
if os.environ.get("CG_MAX_WORKER_LOST"):
    CELERY_GUARD_MAX_WORKER_LOST = int(os.environ["CG_MAX_WORKER_LOST"])
if os.environ.get("CG_DEAD_LETTER_WRITE_TRIES"):
    CELERY_GUARD_DEAD_LETTER_WRITE_TRIES = int(os.environ["CG_DEAD_LETTER_WRITE_TRIES"])
if os.environ.get("CG_PREFETCH_MULTIPLIER"):
    CELERY_WORKER_PREFETCH_MULTIPLIER = int(os.environ["CG_PREFETCH_MULTIPLIER"])
if os.environ.get("CG_IDEMPOTENCY_LEASE"):
    CELERY_GUARD_IDEMPOTENCY_LEASE = float(os.environ["CG_IDEMPOTENCY_LEASE"])
if os.environ.get("CG_IDEMPOTENCY_PUBLISH_GRACE"):
    CELERY_GUARD_IDEMPOTENCY_PUBLISH_GRACE = float(os.environ["CG_IDEMPOTENCY_PUBLISH_GRACE"])
# The idempotency ledger: the database unless a test's processes ask for Redis; Redis keys
# carry the run id so concurrent runs on the shared Redis never meet.
CELERY_GUARD_IDEMPOTENCY_BACKEND = os.environ.get("CG_IDEMPOTENCY_BACKEND", "database")
CELERY_GUARD_IDEMPOTENCY_REDIS_URL = REDIS_URL  # also when a worker's broker is RabbitMQ
CELERY_GUARD_IDEMPOTENCY_REDIS_PREFIX = os.environ.get(
    "CG_IDEMPOTENCY_REDIS_PREFIX", f"cgt-{RUN_ID}:idem:"
)

ROOT_URLCONF = "tests.urls"
# Observability: processes started with CG_JSON_LOGS write the guard's records as JSON lines.
if os.environ.get("CG_JSON_LOGS"):
    LOGGING = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "celery_guard.observability.logs.JsonFormatter"}},
        "handlers": {"json": {"class": "logging.StreamHandler", "formatter": "json"}},
        "loggers": {"celery_guard": {"handlers": ["json"], "level": "INFO", "propagate": False}},
    }
if os.environ.get("CG_ROLLUP_FLUSH_SECONDS"):
    CELERY_GUARD_ROLLUP_FLUSH_SECONDS = float(os.environ["CG_ROLLUP_FLUSH_SECONDS"])
# Sentry with a transport that appends each event to a file (the Sentry tests read it).
if os.environ.get("CG_SENTRY_FILE"):
    from tests.sentry_transport import init_sentry

    init_sentry(os.environ["CG_SENTRY_FILE"])
