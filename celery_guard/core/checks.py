"""System checks every feature shares: settings, serializers, eager mode, connections.

Ids are stable: ``celery_guard.E001``... for errors and ``celery_guard.W001``... for warnings;
each feature's ``checks`` module owns the ids of its hazards (``docs/checks.md`` lists them).
Each check reads the Celery app that guarded tasks bind to (``celery.current_app``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from celery import current_app
from django.core.checks import CheckMessage, Error, Warning
from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import autodiscover_modules

from celery_guard import conf
from celery_guard.core import dbreuse, options, pipeline

#: Redis's visibility timeout when the project sets none (Celery's Redis broker docs).
REDIS_DEFAULT_VISIBILITY_TIMEOUT = 3600
REDIS_SCHEMES = ("redis", "rediss", "sentinel", "valkey", "valkeys")

#: The signature of a Django system check.
Check = Callable[..., list[CheckMessage]]


def celery_app() -> Any:
    """The Celery app that guarded tasks bind to."""
    return current_app._get_current_object()


def guarded_tasks(app: Any) -> list[Any]:
    """Return the guarded tasks of ``app``, importing the project's task modules first."""
    # What Celery's autodiscovery imports for a Django project; its own loader would run the
    # system checks again from inside this one.
    autodiscover_modules("tasks")
    return [t for t in app.tasks.values() if pipeline.is_guarded(t)]


def redis_visibility_timeout(app: Any) -> float | None:
    """The visibility timeout of a Redis broker, or None when the broker is not Redis."""
    url = app.conf.broker_url or ""
    if not isinstance(url, str) or url.split(":", 1)[0] not in REDIS_SCHEMES:
        return None
    transport = app.conf.broker_transport_options or {}
    return float(transport.get("visibility_timeout", REDIS_DEFAULT_VISIBILITY_TIMEOUT))


def setting_values_check(errors: Callable[[], Iterable[str]]) -> Check:
    """E001 for one feature's settings: each text ``errors()`` yields becomes an error."""

    def check_setting_values(
        app_configs: Sequence[Any] | None = None, **kw: Any
    ) -> list[CheckMessage]:
        """E001: a ``CELERY_GUARD_*`` setting with a value of the wrong type or out of range."""
        return [Error(text, id="celery_guard.E001") for text in errors()]

    return check_setting_values


def check_unknown_settings(
    app_configs: Sequence[Any] | None = None, **kw: Any
) -> list[CheckMessage]:
    """W001: a ``CELERY_GUARD_*`` setting the package does not know (usually a typo)."""
    known = conf.known_settings()
    return [
        Warning(
            f"Unknown setting {name}{options.suggest(name, known)}.",
            hint="celery_guard ignores it; see the settings reference in the docs.",
            id="celery_guard.W001",
        )
        for name in conf.declared()
        if name not in known
    ]


def setting_errors() -> Iterable[str]:
    """Errors in the settings every feature shares."""
    size = conf.raw("MAX_PAYLOAD_BYTES")
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        yield f"CELERY_GUARD_MAX_PAYLOAD_BYTES must be a positive int, got {size!r}"


check_setting_values = setting_values_check(setting_errors)


def duration_errors(names: Iterable[str]) -> Iterable[str]:
    """The duration settings among ``names`` that ``conf.duration`` refuses (NaN, out of range)."""
    for name in names:
        if name in conf.OPTIONAL_DURATIONS and conf.raw(name) is None:
            continue
        try:
            conf.duration(name)
        except ImproperlyConfigured as exc:
            yield str(exc)


def check_pickle(app_configs: Sequence[Any] | None = None, **kw: Any) -> list[CheckMessage]:
    """E002: pickle accepted or produced: a message from the broker can run code."""
    conf_ = celery_app().conf
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


def check_always_eager(app_configs: Sequence[Any] | None = None, **kw: Any) -> list[CheckMessage]:
    """W004: ``task_always_eager`` on: tasks run in the caller, bypassing broker and guard."""
    if celery_app().conf.task_always_eager:
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


def check_db_reuse(app_configs: Sequence[Any] | None = None, **kw: Any) -> list[CheckMessage]:
    """W010: ``CELERY_DB_REUSE_MAX`` turned off: workers reconnect around every task.

    Unset, the guard gives workers ``celery_guard.core.dbreuse.DEFAULT_DB_REUSE_MAX``; a
    project that sets 0 (or another false value) gets Celery's per-task connections, which this
    names. Read the way Celery's Django fixup reads it, which is what decides the behaviour.
    """
    value = celery_app().conf.get("CELERY_DB_REUSE_MAX")
    if value is None or value:
        return []
    return [
        Warning(
            f"CELERY_DB_REUSE_MAX is {value!r}: workers open a new database connection for "
            "every task.",
            hint=(
                "Celery's Django integration then closes the database connections before and "
                "after every task, so each task that touches the database (the database "
                "idempotency ledger, dead letters, your own queries) pays a new connection. "
                "Remove the setting (the guard then keeps connections for "
                f"{dbreuse.DEFAULT_DB_REUSE_MAX} tasks and replaces unusable ones) or set a "
                "positive count."
            ),
            id="celery_guard.W010",
        )
    ]


#: The shared checks, in the order they are registered.
CHECKS: tuple[Check, ...] = (
    check_unknown_settings,
    check_setting_values,
    check_pickle,
    check_always_eager,
    check_db_reuse,
)
