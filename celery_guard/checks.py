"""System checks for the Celery configuration hazards that celery_guard guards against.

Ids are stable: ``celery_guard.E001``... for errors and ``celery_guard.W001``... for warnings.
Each check reads the Celery app that guarded tasks bind to (``celery.current_app``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import timedelta
from typing import Any

from celery import current_app
from django.conf import settings as django_settings
from django.core.checks import CheckMessage, Error, Warning
from django.utils.module_loading import autodiscover_modules, import_string

from celery_guard import backoff, conf, ledger, options, retry, routing, slots

#: Redis's visibility timeout when the project sets none (Celery's Redis broker docs).
REDIS_DEFAULT_VISIBILITY_TIMEOUT = 3600
REDIS_SCHEMES = ("redis", "rediss", "sentinel", "valkey", "valkeys")


def _celery_app() -> Any:
    return current_app._get_current_object()


def guarded_tasks(app: Any) -> list[Any]:
    """Return the guarded tasks of ``app``, importing the project's task modules first."""
    from celery_guard.task import GuardedTask

    # What Celery's autodiscovery imports for a Django project; its own loader would run the
    # system checks again from inside this one.
    autodiscover_modules("tasks")
    return [t for t in app.tasks.values() if isinstance(t, GuardedTask)]


def check_unknown_settings(
    app_configs: Sequence[Any] | None = None, **kw: Any
) -> list[CheckMessage]:
    """W001: a ``CELERY_GUARD_*`` setting the package does not know (usually a typo)."""
    known = conf.known_settings()
    messages: list[CheckMessage] = []
    for name in dir(django_settings):
        if name.startswith(conf.PREFIX) and name not in known:
            messages.append(
                Warning(
                    f"Unknown setting {name}{options.suggest(name, known)}.",
                    hint="celery_guard ignores it; see the settings reference in the docs.",
                    id="celery_guard.W001",
                )
            )
    return messages


def _setting_errors() -> Iterable[str]:
    queues = conf.raw("PRIORITY_QUEUES")
    if not (
        isinstance(queues, Mapping)
        and queues
        and all(isinstance(k, str) and isinstance(v, str) and v for k, v in queues.items())
    ):
        yield (
            "CELERY_GUARD_PRIORITY_QUEUES must be a non-empty dict of level name -> queue "
            f"name (str), got {queues!r}"
        )
    elif conf.raw("DEFAULT_PRIORITY") not in queues:
        yield (
            f"CELERY_GUARD_DEFAULT_PRIORITY {conf.raw('DEFAULT_PRIORITY')!r} is not a level of "
            f"CELERY_GUARD_PRIORITY_QUEUES ({', '.join(map(repr, queues))})"
        )
    size = conf.raw("MAX_PAYLOAD_BYTES")
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        yield f"CELERY_GUARD_MAX_PAYLOAD_BYTES must be a positive int, got {size!r}"
    if not isinstance(conf.raw("INSTALL_ROUTER"), bool):
        yield "CELERY_GUARD_INSTALL_ROUTER must be True or False"
    yield from _failure_setting_errors()
    yield from _beat_setting_errors()
    yield from _idempotency_setting_errors()
    yield from _dlq_setting_errors()


def _failure_setting_errors() -> Iterable[str]:
    for name, validate in (
        ("MAX_ATTEMPTS", retry.MAX_ATTEMPTS.validate),
        ("BACKOFF", backoff.parse),
        ("DEADLINE", retry.DEADLINE.validate),
    ):
        try:
            validate(conf.raw(name))
        except (TypeError, ValueError) as exc:
            yield f"CELERY_GUARD_{name}: {exc}"
    if conf.raw("UNKNOWN_ERRORS") not in (retry.TRANSIENT, retry.PERMANENT):
        yield (
            "CELERY_GUARD_UNKNOWN_ERRORS must be 'transient' or 'permanent', got "
            f"{conf.raw('UNKNOWN_ERRORS')!r}"
        )
    classifier = conf.raw("ERROR_CLASSIFIER")
    if classifier is not None and not isinstance(classifier, str):
        yield f"CELERY_GUARD_ERROR_CLASSIFIER must be a dotted path (str), got {classifier!r}"
    for name, minimum in (("MAX_THROTTLED", 0), ("MAX_WORKER_LOST", 1)):
        value = conf.raw(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            yield f"CELERY_GUARD_{name} must be an int >= {minimum}, got {value!r}"
    for name in ("SOFT_TIME_LIMIT", "TIME_LIMIT"):
        value = conf.raw(name)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0
        ):
            yield f"CELERY_GUARD_{name} must be None or a positive number of seconds"
    if not isinstance(conf.raw("CAPTURE_UNGUARDED"), bool):
        yield "CELERY_GUARD_CAPTURE_UNGUARDED must be True or False"


def _beat_setting_errors() -> Iterable[str]:
    name = conf.raw("BEAT_LOCK_NAME")
    if not isinstance(name, str) or not name or len(name) > 200:
        yield f"CELERY_GUARD_BEAT_LOCK_NAME must be a non-empty str of <= 200 chars, got {name!r}"
    lease = conf.raw("BEAT_LEASE_SECONDS")
    if isinstance(lease, bool) or not isinstance(lease, (int, float)) or lease <= 0:
        yield f"CELERY_GUARD_BEAT_LEASE_SECONDS must be a positive number, got {lease!r}"
    policies = conf.raw("BEAT_POLICIES")
    if not isinstance(policies, Mapping):
        yield f"CELERY_GUARD_BEAT_POLICIES must be a dict, got {type(policies).__name__}"
        return
    for entry, value in policies.items():
        try:
            slots.parse_policy(value)
        except (TypeError, ValueError) as exc:
            yield f"CELERY_GUARD_BEAT_POLICIES[{entry!r}]: {exc}"


def _idempotency_setting_errors() -> Iterable[str]:
    backend = conf.raw("IDEMPOTENCY_BACKEND")
    if backend not in ("database", "redis"):
        yield f"CELERY_GUARD_IDEMPOTENCY_BACKEND must be 'database' or 'redis', got {backend!r}"
    url = conf.raw("IDEMPOTENCY_REDIS_URL")
    schemes = ledger.REDIS_SCHEMES
    if url is not None and not (isinstance(url, str) and url.split(":", 1)[0] in schemes):
        yield f"CELERY_GUARD_IDEMPOTENCY_REDIS_URL must be None or a redis:// URL, got {url!r}"
    if not isinstance(conf.raw("IDEMPOTENCY_REDIS_PREFIX"), str):
        yield "CELERY_GUARD_IDEMPOTENCY_REDIS_PREFIX must be a str"
    names = ("DEDUP_WINDOW", "IDEMPOTENCY_LEASE", "IDEMPOTENCY_PUBLISH_GRACE")
    for name in (*names, "IDEMPOTENCY_RETENTION"):
        value = conf.raw(name)
        seconds = (
            value.total_seconds()
            if isinstance(value, timedelta)
            else value
            if isinstance(value, (int, float)) and not isinstance(value, bool)
            else None
        )
        if seconds is None or seconds <= 0:
            yield (
                f"CELERY_GUARD_{name} must be a positive number of seconds or a timedelta, "
                f"got {value!r}"
            )
    if not isinstance(conf.raw("RELEASE_ON_DEAD_LETTER"), bool):
        yield "CELERY_GUARD_RELEASE_ON_DEAD_LETTER must be True or False"


def _dlq_setting_errors() -> Iterable[str]:
    fields = conf.raw("REDACT_FIELDS")
    if isinstance(fields, str) or not (
        isinstance(fields, (list, tuple, frozenset, set))
        and all(isinstance(f, str) and f for f in fields)
    ):
        yield f"CELERY_GUARD_REDACT_FIELDS must be a list of non-empty strings, got {fields!r}"
    for name in ("REDACTOR", "SENTRY_EVENT_URL"):
        value = conf.raw(name)
        if value is not None and not isinstance(value, str):
            yield f"CELERY_GUARD_{name} must be None or a string, got {value!r}"
    url = conf.raw("SENTRY_EVENT_URL")
    if isinstance(url, str) and "{event_id}" not in url:
        yield "CELERY_GUARD_SENTRY_EVENT_URL must contain '{event_id}'"
    days = conf.raw("DLQ_RETENTION_DAYS")
    if isinstance(days, bool) or not isinstance(days, (int, float)) or days <= 0:
        yield f"CELERY_GUARD_DLQ_RETENTION_DAYS must be a positive number, got {days!r}"


def check_setting_values(app_configs: Sequence[Any] | None = None, **kw: Any) -> list[CheckMessage]:
    """E001: a ``CELERY_GUARD_*`` setting with a value of the wrong type or out of range."""
    return [Error(text, id="celery_guard.E001") for text in _setting_errors()]


def check_pickle(app_configs: Sequence[Any] | None = None, **kw: Any) -> list[CheckMessage]:
    """E002: pickle accepted or produced: a message from the broker can run code."""
    conf_ = _celery_app().conf
    where = [
        name
        for name in ("accept_content", "result_accept_content")
        if "pickle" in (conf_.get(name) or ())
        or "application/x-python-serialize" in (conf_.get(name) or ())
    ]
    where += [n for n in ("task_serializer", "result_serializer") if conf_.get(n) == "pickle"]
    if not where:
        return []
    return [
        Error(
            f"Celery is configured to use pickle ({', '.join(where)}).",
            hint="Anyone who can write to the broker can run code in your workers; use JSON.",
            id="celery_guard.E002",
        )
    ]


def check_acks_late(app_configs: Sequence[Any] | None = None, **kw: Any) -> list[CheckMessage]:
    """W002: ``task_acks_late`` without ``task_reject_on_worker_lost``."""
    conf_ = _celery_app().conf
    if conf_.task_acks_late and not conf_.task_reject_on_worker_lost:
        return [
            Warning(
                "task_acks_late is on but task_reject_on_worker_lost is off.",
                hint=(
                    "Celery acks the message of a task whose worker process was killed (OOM, "
                    "SIGKILL), so the job is lost (celery#2840). Set "
                    "CELERY_TASK_REJECT_ON_WORKER_LOST = True; guarded tasks set both."
                ),
                id="celery_guard.W002",
            )
        ]
    return []


def _redis_visibility_timeout(app: Any) -> float | None:
    """The visibility timeout of a Redis broker, or None when the broker is not Redis."""
    url = app.conf.broker_url or ""
    if not isinstance(url, str) or url.split(":", 1)[0] not in REDIS_SCHEMES:
        return None
    transport = app.conf.broker_transport_options or {}
    return float(transport.get("visibility_timeout", REDIS_DEFAULT_VISIBILITY_TIMEOUT))


def _longest_run(app: Any) -> tuple[float, str] | None:
    candidates: list[tuple[float, str]] = []
    for name in ("task_time_limit", "task_soft_time_limit"):
        value = app.conf.get(name)
        if value:
            candidates.append((float(value), f"CELERY_{name.upper()}"))
    for task in guarded_tasks(app):
        for attr in ("time_limit", "soft_time_limit"):
            value = getattr(task, attr, None)
            if value:
                candidates.append((float(value), f"{task.name}.{attr}"))
    return max(candidates) if candidates else None


def check_visibility_timeout(
    app_configs: Sequence[Any] | None = None, **kw: Any
) -> list[CheckMessage]:
    """W003: a Redis broker whose visibility timeout is not longer than a guarded task may run."""
    app = _celery_app()
    timeout = _redis_visibility_timeout(app)
    longest = _longest_run(app) if timeout is not None else None
    if timeout is None or longest is None:
        return []
    seconds, source = longest
    if timeout > seconds:
        return []
    return [
        Warning(
            f"The Redis visibility_timeout ({timeout:g}s) is not longer than {source} "
            f"({seconds:g}s).",
            hint=(
                "Redis redelivers a late-acked message to another worker after the visibility "
                "timeout, while the first run may still be going (celery#5935). Set "
                "CELERY_BROKER_TRANSPORT_OPTIONS = {'visibility_timeout': ...} above the "
                "longest time limit; on a shared Redis the shortest one configured wins."
            ),
            id="celery_guard.W003",
        )
    ]


def check_classifier(app_configs: Sequence[Any] | None = None, **kw: Any) -> list[CheckMessage]:
    """E005: ``CELERY_GUARD_ERROR_CLASSIFIER`` does not import as a callable."""
    path = conf.raw("ERROR_CLASSIFIER")
    if not isinstance(path, str):
        return []
    try:
        found = import_string(path)
    except ImportError as exc:
        problem = f"cannot be imported ({exc})"
    else:
        if callable(found):
            return []
        problem = f"is not callable ({type(found).__name__})"
    return [
        Error(
            f"CELERY_GUARD_ERROR_CLASSIFIER {path!r} {problem}.",
            hint="Point it at a function taking an exception and returning 'transient', "
            "'permanent', 'throttled' or None.",
            id="celery_guard.E005",
        )
    ]


def check_retry_delay_visibility(
    app_configs: Sequence[Any] | None = None, **kw: Any
) -> list[CheckMessage]:
    """W008: a Redis visibility timeout not longer than a guarded task's longest retry delay."""
    app = _celery_app()
    timeout = _redis_visibility_timeout(app)
    if timeout is None or list(_failure_setting_errors()):
        return []
    default = conf.raw("BACKOFF")
    delays = sorted(
        (retry.longest_delay(task.guard_options, default), task.name) for task in guarded_tasks(app)
    )
    if not delays or delays[-1][0] < timeout:
        return []
    seconds, name = delays[-1]
    return [
        Warning(
            f"The Redis visibility_timeout ({timeout:g}s) is not longer than the longest retry "
            f"delay of {name} ({seconds:g}s).",
            hint=(
                "A retry waits unacknowledged in a worker until its countdown ends; past the "
                "visibility timeout Redis delivers it again, in a loop (celery#2599, "
                "kombu#337). Lower the backoff cap or raise visibility_timeout."
            ),
            id="celery_guard.W008",
        )
    ]


def check_always_eager(app_configs: Sequence[Any] | None = None, **kw: Any) -> list[CheckMessage]:
    """W004: ``task_always_eager`` on: tasks run in the caller, bypassing broker and guard."""
    if _celery_app().conf.task_always_eager:
        return [
            Warning(
                "task_always_eager is on.",
                hint=(
                    "Tasks run inline in the caller: no broker, no worker, no acks or "
                    "redelivery, so nothing celery_guard protects is exercised. Test with a "
                    "real worker instead."
                ),
                id="celery_guard.W004",
            )
        ]
    return []


def _declared_queues(app: Any) -> set[str] | None:
    declared = app.conf.task_queues
    if not declared:
        return None
    return {getattr(q, "name", q) for q in declared}


def check_priority_queues(
    app_configs: Sequence[Any] | None = None, **kw: Any
) -> list[CheckMessage]:
    """E003 / W005: a mapped priority queue that is not declared in ``task_queues``.

    E003 when ``task_create_missing_queues`` is off (publishing to it fails); W005 when it is
    on (workers started without ``-Q`` consume only the declared queues).
    """
    if list(_setting_errors()):
        return []
    app = _celery_app()
    declared = _declared_queues(app)
    if declared is None:
        return []
    missing = sorted(set(conf.raw("PRIORITY_QUEUES").values()) - declared)
    if not missing:
        return []
    names = ", ".join(map(repr, missing))
    if not app.conf.task_create_missing_queues:
        return [
            Error(
                f"Priority queue(s) {names} are not declared in CELERY_TASK_QUEUES and "
                "task_create_missing_queues is off.",
                hint="Publishing a guarded task to them fails; declare them.",
                id="celery_guard.E003",
            )
        ]
    return [
        Warning(
            f"Priority queue(s) {names} are not declared in CELERY_TASK_QUEUES.",
            hint=(
                "Workers started without -Q consume only the declared queues, so guarded "
                "tasks of these levels wait forever. Declare them, or run "
                "`manage.py celery_guard doctor` for the worker command lines."
            ),
            id="celery_guard.W005",
        )
    ]


def check_router(app_configs: Sequence[Any] | None = None, **kw: Any) -> list[CheckMessage]:
    """W006: the guard router is neither installed automatically nor listed in task_routes."""
    if conf.raw("INSTALL_ROUTER") is not False or routing.is_installed(_celery_app()):
        return []
    return [
        Warning(
            "CELERY_GUARD_INSTALL_ROUTER is False and task_routes does not list "
            f"{routing.ROUTER_PATH!r}.",
            hint="Guarded tasks are not routed by priority; add the router to CELERY_TASK_ROUTES.",
            id="celery_guard.W006",
        )
    ]


def beat_max_loop_interval(app: Any) -> float:
    """The loop interval a guarded beat of ``app`` uses unless ``--max-interval`` overrides it."""
    from django_celery_beat.schedulers import DEFAULT_MAX_INTERVAL

    return float(app.conf.beat_max_loop_interval or DEFAULT_MAX_INTERVAL)


def check_beat_lease(app_configs: Sequence[Any] | None = None, **kw: Any) -> list[CheckMessage]:
    """E006: the beat lease is not at least twice as long as the beat loop interval."""
    if list(_beat_setting_errors()):
        return []
    lease = float(conf.raw("BEAT_LEASE_SECONDS"))
    interval = beat_max_loop_interval(_celery_app())
    if lease >= 2 * interval:
        return []
    return [
        Error(
            f"CELERY_GUARD_BEAT_LEASE_SECONDS ({lease:g}s) is less than twice the beat loop "
            f"interval ({interval:g}s, CELERY_BEAT_MAX_LOOP_INTERVAL).",
            hint=(
                "A leader renews its lease once per loop; a lease that can expire between two "
                "renewals makes leadership flap between beats (single-beat#6). Make the "
                "lease at least twice the loop interval."
            ),
            id="celery_guard.E006",
        )
    ]


#: ``beat_scheduler`` values that name django-celery-beat's scheduler, which has no lock.
UNGUARDED_SCHEDULERS = frozenset(
    {
        "django",
        "django_celery_beat.schedulers:DatabaseScheduler",
        "django_celery_beat.schedulers.DatabaseScheduler",
    }
)


def check_beat_scheduler(app_configs: Sequence[Any] | None = None, **kw: Any) -> list[CheckMessage]:
    """W009: ``CELERY_BEAT_SCHEDULER`` is django-celery-beat's unguarded scheduler."""
    scheduler = _celery_app().conf.beat_scheduler
    if not isinstance(scheduler, str) or scheduler not in UNGUARDED_SCHEDULERS:
        return []
    return [
        Warning(
            f"CELERY_BEAT_SCHEDULER is {scheduler!r}, which has no lock.",
            hint=(
                "Two beat processes each fire every periodic task (django-celery-beat#337). "
                "Use 'celery_guard.beat:GuardedScheduler': it dispatches behind a database "
                "lease and fires each slot at most once."
            ),
            id="celery_guard.W009",
        )
    ]


def check_idempotency_redis(
    app_configs: Sequence[Any] | None = None, **kw: Any
) -> list[CheckMessage]:
    """E004: the Redis idempotency ledger has no Redis to use."""
    if conf.raw("IDEMPOTENCY_BACKEND") != "redis" or list(_setting_errors()):
        return []
    try:
        ledger.redis_url()
    except ValueError as exc:
        return [
            Error(
                f"CELERY_GUARD_IDEMPOTENCY_BACKEND is 'redis' but {exc}.",
                hint="Set CELERY_GUARD_IDEMPOTENCY_REDIS_URL = 'redis://...'.",
                id="celery_guard.E004",
            )
        ]
    return []


def check_dedup_window(app_configs: Sequence[Any] | None = None, **kw: Any) -> list[CheckMessage]:
    """W007: a dedup window not longer than the Redis visibility timeout.

    A message Redis redelivers after the timeout arrives when the key's window may be over,
    so the key no longer blocks and the body runs again.
    """
    app = _celery_app()
    url = app.conf.broker_url or ""
    if not isinstance(url, str) or url.split(":", 1)[0] not in REDIS_SCHEMES:
        return []
    transport = app.conf.broker_transport_options or {}
    timeout = float(transport.get("visibility_timeout", REDIS_DEFAULT_VISIBILITY_TIMEOUT))
    short = []
    for task in guarded_tasks(app):
        if options.resolve("idempotency_key", {}, task.guard_options) is None:
            continue
        window = options.resolve("dedup_window", {}, task.guard_options)
        seconds = conf.GuardSettings.seconds(window)
        if seconds <= timeout:
            short.append(f"{task.name} ({seconds:g}s)")
    if not short:
        return []
    return [
        Warning(
            f"Dedup window not longer than the Redis visibility_timeout ({timeout:g}s): "
            f"{', '.join(sorted(short))}.",
            hint=(
                "A message redelivered after the visibility timeout (a worker lost before its "
                "ack) can find the key's window over and run the body again. Make dedup_window "
                "(or CELERY_GUARD_DEDUP_WINDOW) longer than the visibility timeout."
            ),
            id="celery_guard.W007",
        )
    ]


def check_db_reuse(app_configs: Sequence[Any] | None = None, **kw: Any) -> list[CheckMessage]:
    """W010: workers reconnect to the database around every task (no ``CELERY_DB_REUSE_MAX``).

    Read the way Celery's Django fixup reads it, which is what decides the behaviour.
    """
    if _celery_app().conf.get("CELERY_DB_REUSE_MAX"):
        return []
    return [
        Warning(
            "CELERY_DB_REUSE_MAX is not set.",
            hint=(
                "Celery's Django integration then closes the database connection before and "
                "after every task, and every guarded run writes to the database (delivery "
                "marker, ledger): each task pays a new connection. Set CELERY_DB_REUSE_MAX "
                "(e.g. 1000); unusable connections are still closed."
            ),
            id="celery_guard.W010",
        )
    ]


#: Every check, in the order ``AppConfig.ready()`` registers them.
ALL: tuple[Callable[..., list[CheckMessage]], ...] = (
    check_unknown_settings,
    check_setting_values,
    check_pickle,
    check_acks_late,
    check_visibility_timeout,
    check_retry_delay_visibility,
    check_classifier,
    check_always_eager,
    check_priority_queues,
    check_router,
    check_beat_lease,
    check_beat_scheduler,
    check_idempotency_redis,
    check_dedup_window,
    check_db_reuse,
)
