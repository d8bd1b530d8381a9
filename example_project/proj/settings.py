"""Settings of the example project.

Real services are used when their URLs are given (``DATABASE_URL``, ``REDIS_URL``);
otherwise SQLite and the Redis at ``REDIS_URL`` that ``devprocs.embedded`` starts for the demo.
"""

import os
from pathlib import Path

import dj_database_url

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-project-not-secret")
# On by default (the admin's static files, error pages); `make demo` turns it off for its
# workers and its own process: a debug cursor records every query, which costs the bulk run
# a few percent per task and grows without bound in a worker.
DEBUG = os.environ.get("DJANGO_DEBUG", "1") != "0"
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
    "hr",
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

ROOT_URLCONF = "proj.urls"
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

SQLITE_PATH = os.environ.get("SQLITE_PATH", str(BASE_DIR / "db.sqlite3"))
if os.environ.get("DATABASE_URL"):
    DATABASES = {"default": dj_database_url.parse(os.environ["DATABASE_URL"])}
else:
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": SQLITE_PATH,
            # Workers and the web process write at once: wait for the lock, and take it at
            # the start of a transaction so two writers cannot deadlock on an upgrade.
            "OPTIONS": {
                "timeout": 30,
                "transaction_mode": "IMMEDIATE",
                "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
            },
        }
    }

USE_TZ = True
TIME_ZONE = "UTC"
STATIC_URL = "static/"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL") or os.environ.get(
    "REDIS_URL", "redis://127.0.0.1:6379/0"
)
CELERY_TASK_IGNORE_RESULT = True
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_SERIALIZER = "json"
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# Redis: redeliver a dead worker's messages within seconds of the visibility timeout
# (docs/failures.md, "How soon Redis redelivers a dead worker's messages").
CELERY_BROKER_TRANSPORT_OPTIONS: dict[str, float] = {
    "visibility_timeout": 3600,
    "unacked_restore_interval": 1,
    "unacked_restore_throttle": 1,
    "unacked_mutex_expire": 30,
}
# `make demo` kills a worker on purpose: Redis hands its unacknowledged messages to another
# consumer after the visibility timeout, so the demo shortens it (and the idempotency lease,
# which must stay below it, celery_guard.W011) to see the redelivery within seconds.
if os.environ.get("DEMO_VISIBILITY_TIMEOUT"):
    CELERY_BROKER_TRANSPORT_OPTIONS["visibility_timeout"] = float(
        os.environ["DEMO_VISIBILITY_TIMEOUT"]
    )
if os.environ.get("DEMO_IDEMPOTENCY_LEASE"):
    CELERY_GUARD_IDEMPOTENCY_LEASE = float(os.environ["DEMO_IDEMPOTENCY_LEASE"])
CELERY_WORKER_HIJACK_ROOT_LOGGER = False

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

# Prometheus metrics from the guard's events only where the workers and the web process share
# a multiprocess directory (celery_guard.W018 explains why counting without one is useless).
CELERY_GUARD_METRICS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))

# The guarded beat (one leader among any number of beat processes) runs the sweep that
# publishes what a dead process left of a bulk run.
CELERY_BEAT_SCHEDULER = "celery_guard.beat:GuardedScheduler"
CELERY_BEAT_SCHEDULE = {
    "celery-guard-sweep-runs": {"task": "celery_guard.sweep_runs", "schedule": 30.0},
}

# The mail gateway's cluster-wide limit (hr.tasks.MAIL_GATEWAY_LIMIT, docs/limits.md).
CELERY_GUARD_LIMITS = {"mail-gateway": {"rate": os.environ.get("MAIL_GATEWAY_RATE", "150/s")}}
