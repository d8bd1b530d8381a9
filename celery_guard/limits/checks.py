"""System checks of limits: ``CELERY_GUARD_LIMITS``, its settings, and hazards of limited tasks."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from django.core.checks import CheckMessage, Error, Warning
from django.db import connections, router

from celery_guard import conf
from celery_guard.core import checks as core_checks
from celery_guard.limits import rules, store
from celery_guard.limits.models import LimitEntry

OUTAGE_CHOICES = ("run", "defer")


def setting_errors() -> Iterable[str]:
    """Errors in the limits' own settings besides ``CELERY_GUARD_LIMITS`` (E001)."""
    yield from core_checks.duration_errors(("LIMITS_LEASE", "LIMITS_DEFER_DELAY", "POLICY_REFRESH"))
    if conf.raw("LIMITS_ON_OUTAGE") not in OUTAGE_CHOICES:
        yield (
            f"CELERY_GUARD_LIMITS_ON_OUTAGE must be one of {OUTAGE_CHOICES!r}, got "
            f"{conf.raw('LIMITS_ON_OUTAGE')!r}"
        )
    backend = conf.raw("LIMITS_BACKEND")
    if backend is not None and backend not in store.BACKENDS:
        yield (
            f"CELERY_GUARD_LIMITS_BACKEND must be None or one of {store.BACKENDS!r}, got "
            f"{backend!r}"
        )
    if not isinstance(conf.raw("LIMITS_REDIS_PREFIX"), str):
        yield "CELERY_GUARD_LIMITS_REDIS_PREFIX must be a str"
    url = conf.raw("LIMITS_REDIS_URL")
    if url is not None and not isinstance(url, str):
        yield "CELERY_GUARD_LIMITS_REDIS_URL must be a str or None"


check_setting_values = core_checks.setting_values_check(setting_errors)


def check_limits_setting(app_configs: Sequence[Any] | None = None, **kw: Any) -> list[CheckMessage]:
    """E008: ``CELERY_GUARD_LIMITS`` is not name -> {rate, concurrency}; E009: a bad value."""
    shape, values = rules.setting_errors()
    hint = 'e.g. CELERY_GUARD_LIMITS = {"mail-gateway": {"rate": "50/s", "concurrency": 10}}'
    found: list[CheckMessage] = [Error(t, hint=hint, id="celery_guard.E008") for t in shape]
    return found + [Error(t, hint=hint, id="celery_guard.E009") for t in values]


def limited_tasks(app: Any) -> list[Any]:
    """The guarded tasks of ``app`` with a limit (concurrency, rate, named or per tenant)."""
    names = tuple(o.name for o in rules.OPTIONS if o is not rules.TENANT)
    return [
        t
        for t in core_checks.guarded_tasks(app)
        if any(t.guard_options.get(name) for name in names)
    ]


def check_unknown_limits(app_configs: Sequence[Any] | None = None, **kw: Any) -> list[CheckMessage]:
    """W012: a guarded task names a limit that ``CELERY_GUARD_LIMITS`` does not define."""
    limits = conf.raw("LIMITS")
    known = set(limits) if isinstance(limits, dict) else set()
    found: list[CheckMessage] = []
    for task in core_checks.guarded_tasks(core_checks.celery_app()):
        for name in task.guard_options.get(rules.LIMITS.name) or ():
            if name not in known:
                found.append(
                    Warning(
                        f"{task.name} names limit {name!r}, which CELERY_GUARD_LIMITS does not "
                        "define.",
                        hint="Its runs fail until the limit is defined; add it to "
                        "CELERY_GUARD_LIMITS or remove it from the task's limits=[...].",
                        id="celery_guard.W012",
                    )
                )
    return found


def check_celery_rate_limit(
    app_configs: Sequence[Any] | None = None, **kw: Any
) -> list[CheckMessage]:
    """W013: Celery's per-worker ``rate_limit`` on a guarded task."""
    return [
        Warning(
            f"{task.name} sets Celery's rate_limit={task.rate_limit!r}, which holds per worker "
            "(not across the cluster) and keeps prefetched messages waiting in the worker.",
            hint="Use the guard's rate='N/s|m|h' option instead (cluster-wide, deferred).",
            id="celery_guard.W013",
        )
        for task in core_checks.guarded_tasks(core_checks.celery_app())
        if getattr(task, "rate_limit", None)
    ]


def check_prefetch(app_configs: Sequence[Any] | None = None, **kw: Any) -> list[CheckMessage]:
    """W014: a prefetch multiplier above 1 while guarded tasks have limits."""
    app = core_checks.celery_app()
    multiplier = app.conf.worker_prefetch_multiplier
    if not isinstance(multiplier, int) or multiplier <= 1 or not limited_tasks(app):
        return []
    return [
        Warning(
            f"worker_prefetch_multiplier is {multiplier} while guarded tasks have limits: "
            "a worker reserves messages it may only defer, ahead of other task types.",
            hint="Set CELERY_WORKER_PREFETCH_MULTIPLIER = 1 (guarded tasks ack late anyway).",
            id="celery_guard.W014",
        )
    ]


def check_store(app_configs: Sequence[Any] | None = None, **kw: Any) -> list[CheckMessage]:
    """W015: the Redis limits store is selected but there is no Redis for it."""
    app = core_checks.celery_app()
    if conf.raw("LIMITS_BACKEND") != "redis" or store.redis_url() is not None:
        return []
    if not limited_tasks(app):
        return []
    return [
        Warning(
            "CELERY_GUARD_LIMITS_BACKEND is 'redis' and guarded tasks have limits, but the "
            "limits store has no Redis: the broker is not Redis and "
            "CELERY_GUARD_LIMITS_REDIS_URL is not set.",
            hint="Set CELERY_GUARD_LIMITS_REDIS_URL, or CELERY_GUARD_LIMITS_BACKEND = "
            "'database'; until then limited tasks run without their limits (or are deferred, "
            "with CELERY_GUARD_LIMITS_ON_OUTAGE='defer').",
            id="celery_guard.W015",
        )
    ]


#: psycopg's isolation levels above READ COMMITTED (2: REPEATABLE READ, 3: SERIALIZABLE).
READ_COMMITTED = 1


def check_database_isolation(
    app_configs: Sequence[Any] | None = None, **kw: Any
) -> list[CheckMessage]:
    """W029: the database limits store on PostgreSQL above READ COMMITTED isolation.

    An admission locks its scope rows and then counts their entries in a second query; under
    REPEATABLE READ or SERIALIZABLE that count reads the snapshot taken before the lock was
    granted, so it misses the runs admitted meanwhile and admits over the limit (or fails on
    serialization errors, and the run goes without its limits).
    """
    if list(setting_errors()) or not limited_tasks(core_checks.celery_app()):
        return []
    if store.backend() != "database":
        return []
    alias = router.db_for_write(LimitEntry) or "default"
    settings = connections[alias].settings_dict
    level = (settings.get("OPTIONS") or {}).get("isolation_level")
    if not settings["ENGINE"].endswith("postgresql") or level is None:
        return []
    try:
        above = int(level) > READ_COMMITTED
    except (TypeError, ValueError):
        return []
    if not above:
        return []
    return [
        Warning(
            f"The limits store is the database {alias!r}, whose isolation level ({level!r}) is "
            "above READ COMMITTED: an admission's count would miss runs admitted while it "
            "waited for its scope's lock, and admit over the limit.",
            hint="Use READ COMMITTED (PostgreSQL's default) for that database, route the "
            "celery_guard LimitEntry/LimitScope models to one that uses it, or set "
            "CELERY_GUARD_LIMITS_BACKEND = 'redis'.",
            id="celery_guard.W029",
        )
    ]


def check_unused_limits(app_configs: Sequence[Any] | None = None, **kw: Any) -> list[CheckMessage]:
    """W022: a limit in ``CELERY_GUARD_LIMITS`` that no guarded task names (usually a typo)."""
    limits = conf.raw("LIMITS")
    if not isinstance(limits, dict) or not limits:
        return []
    used = {
        name
        for task in core_checks.guarded_tasks(core_checks.celery_app())
        for name in task.guard_options.get(rules.LIMITS.name) or ()
    }
    return [
        Warning(
            f"CELERY_GUARD_LIMITS defines {name!r}, which no guarded task names.",
            hint="Name it in a task's limits=[...], or remove it.",
            id="celery_guard.W022",
        )
        for name in limits
        if name not in used
    ]


CHECKS: tuple[core_checks.Check, ...] = (
    check_setting_values,
    check_limits_setting,
    check_unknown_limits,
    check_celery_rate_limit,
    check_prefetch,
    check_store,
    check_database_isolation,
    check_unused_limits,
)
