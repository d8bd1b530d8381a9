"""Settings of the test suite: its own project (the test app, the admin), isolated per run.

Every run gets a run id (inherited by the worker processes it starts) that prefixes its
queue names and names its test database, so two runs on one machine share no state.
Without ``REDIS_URL`` the run reserves a port for an embedded ``redis-server`` and exports its
URL; the server itself starts only when a test needs Redis (the ``redis_url`` fixture), so the
unit tests run with no service at all.
"""

import os
import tempfile
import uuid

import dj_database_url

from devprocs.embedded import free_port

RUN_ID = os.environ.setdefault("CG_TEST_RUN_ID", uuid.uuid4().hex[:8])

#: The port of the embedded Redis the ``redis_url`` fixture starts, or None with ``REDIS_URL``.
CG_TEST_EMBEDDED_REDIS_PORT = None
if not os.environ.get("REDIS_URL"):
    CG_TEST_EMBEDDED_REDIS_PORT = free_port()
    # Exported: the worker processes the suite starts inherit it and start nothing.
    os.environ["REDIS_URL"] = f"redis://127.0.0.1:{CG_TEST_EMBEDDED_REDIS_PORT}/0"
REDIS_URL = os.environ["REDIS_URL"]

SECRET_KEY = "celery-guard-tests-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "testserver"]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_celery_beat",
    "celery_guard",
    "tests.testapp",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    # A request id for each request, carried into the tasks it enqueues and their logs.
    "celery_guard.middleware.RequestIdMiddleware",
]

ROOT_URLCONF = "tests.urls"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]

USE_TZ = True
TIME_ZONE = "UTC"
STATIC_URL = "static/"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

if os.environ.get("DATABASE_URL"):
    _db = dj_database_url.parse(os.environ["DATABASE_URL"])
    _db["TEST"] = {"NAME": f"test_celery_guard_{RUN_ID}"}
else:
    _db = {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.path.join(tempfile.gettempdir(), f"cgt-{RUN_ID}-unused.sqlite3"),
        # Workers and the test process write at once: wait for the lock, and take it at the
        # start of a transaction so two writers cannot deadlock on an upgrade.
        "OPTIONS": {
            "timeout": 30,
            "transaction_mode": "IMMEDIATE",
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        },
        "TEST": {"NAME": os.path.join(tempfile.gettempdir(), f"cgt-{RUN_ID}.sqlite3")},
    }
# A worker started by the suite connects to the test database the suite created.
if os.environ.get("CG_WORKER_DB_NAME"):
    _db["NAME"] = os.environ["CG_WORKER_DB_NAME"]
# Beat processes started by the suite: a connection name to find them by (PostgreSQL).
if os.environ.get("CG_DB_APPLICATION_NAME") and _db["ENGINE"].endswith("postgresql"):
    _db.setdefault("OPTIONS", {})["application_name"] = os.environ["CG_DB_APPLICATION_NAME"]
DATABASES = {"default": _db}

# Celery: the guard's recommended delivery settings, this run's queues.
CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL") or REDIS_URL
CELERY_TASK_IGNORE_RESULT = True
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_SERIALIZER = "json"
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_TASK_DEFAULT_QUEUE = f"cgt-{RUN_ID}-celery"
CELERY_GUARD_PRIORITY_QUEUES = {
    level: f"cgt-{RUN_ID}-{level}" for level in ("high", "default", "low")
}
# Worker fixtures shorten Redis's redelivery delay to test crashes (extra_env).
CELERY_BROKER_TRANSPORT_OPTIONS = {
    "visibility_timeout": float(os.environ.get("CG_VISIBILITY_TIMEOUT", "3600")),
    # This run's own unacked bookkeeping: kombu's keys are global to the Redis database, and a
    # worker SIGKILLed inside a restore (by another test, or another run on the same Redis)
    # holds the restore mutex until it expires (kombu's default: 300 s, no restore meanwhile).
    "unacked_key": f"cgt-{RUN_ID}-unacked",
    "unacked_index_key": f"cgt-{RUN_ID}-unacked-index",
    "unacked_mutex_key": f"cgt-{RUN_ID}-unacked-mutex",
    "unacked_mutex_expire": 15,
    # Look for a dead worker's messages every second (kombu's default: a scan every ~100 s).
    "unacked_restore_interval": 1,
    "unacked_restore_throttle": 1,
}

# Beat processes started by the suite: a short lease under this run's lock name.
CELERY_GUARD_BEAT_LOCK_NAME = f"cgt-{RUN_ID}"
if os.environ.get("CG_BEAT_LEASE_SECONDS"):
    CELERY_GUARD_BEAT_LEASE_SECONDS = float(os.environ["CG_BEAT_LEASE_SECONDS"])
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

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {
        "celery_guard": {
            "handlers": ["console"],
            "level": os.environ.get("CELERY_GUARD_LOG_LEVEL", "INFO"),
            "propagate": False,
        }
    },
}
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
# Prometheus metrics only where the processes share a multiprocess directory (W018).
CELERY_GUARD_METRICS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
# Sentry with a transport that appends each event to a file (the Sentry tests read it).
if os.environ.get("CG_SENTRY_FILE"):
    from tests.support.sentry_transport import init_sentry

    init_sentry(os.environ["CG_SENTRY_FILE"])
    # Beat entries of the cron check-in test: one monitored under its own name, one by slug.
    CELERY_GUARD_BEAT_POLICIES = {
        "obs cron/ok": {"sentry_monitor": True},
        "obs-cron-doomed": {"sentry_monitor": "doomed-monitor"},
    }
# The delivery schedule's Redis keys carry the run id too.
CELERY_GUARD_SCHEDULE_REDIS_PREFIX = f"cgt-{RUN_ID}:schedule:"
if os.environ.get("CG_DELIVERY_LEASE"):
    CELERY_GUARD_DELIVERY_LEASE = float(os.environ["CG_DELIVERY_LEASE"])
if os.environ.get("CG_DELIVERY_BATCH"):
    CELERY_GUARD_DELIVERY_BATCH = int(os.environ["CG_DELIVERY_BATCH"])

# Limits (docs/limits.md): a named limit the test tasks use, keys apart per test run.
CELERY_GUARD_LIMITS = {"test-gateway": {"rate": "1000/s", "concurrency": 1}}
CELERY_GUARD_LIMITS_REDIS_URL = REDIS_URL
# The limits store of this run's processes (tests/support/limits.py parametrizes it).
CELERY_GUARD_LIMITS_BACKEND = os.environ.get("CG_LIMITS_BACKEND") or None
CELERY_GUARD_LIMITS_REDIS_PREFIX = f"cgt-{RUN_ID}:limits:"
CELERY_GUARD_LIMITS_DEFER_DELAY = 0.3
CELERY_GUARD_POLICY_REFRESH = 0.5
if os.environ.get("CG_LIMITS_LEASE"):
    CELERY_GUARD_LIMITS_LEASE = float(os.environ["CG_LIMITS_LEASE"])
