"""System checks of idempotency keys: the ledger backend, its Redis, the dedup window."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from django.core.checks import CheckMessage, Error, Warning

from celery_guard import conf
from celery_guard.core import checks as core_checks
from celery_guard.idempotency import keys, ledger


def setting_errors() -> Iterable[str]:
    """Errors in the idempotency settings."""
    backend = conf.raw("IDEMPOTENCY_BACKEND")
    if backend not in ("database", "redis"):
        yield f"CELERY_GUARD_IDEMPOTENCY_BACKEND must be 'database' or 'redis', got {backend!r}"
    url = conf.raw("IDEMPOTENCY_REDIS_URL")
    schemes = ledger.REDIS_SCHEMES
    if url is not None and not (isinstance(url, str) and url.split(":", 1)[0] in schemes):
        yield f"CELERY_GUARD_IDEMPOTENCY_REDIS_URL must be None or a redis:// URL, got {url!r}"
    if not isinstance(conf.raw("IDEMPOTENCY_REDIS_PREFIX"), str):
        yield "CELERY_GUARD_IDEMPOTENCY_REDIS_PREFIX must be a str"
    yield from core_checks.duration_errors(
        (
            "DEDUP_WINDOW",
            "IDEMPOTENCY_LEASE",
            "IDEMPOTENCY_PUBLISH_GRACE",
            "IDEMPOTENCY_START_GRACE",
            "IDEMPOTENCY_RETENTION",
        )
    )
    if not isinstance(conf.raw("RELEASE_ON_DEAD_LETTER"), bool):
        yield "CELERY_GUARD_RELEASE_ON_DEAD_LETTER must be True or False"


check_setting_values = core_checks.setting_values_check(setting_errors)


def check_idempotency_redis(
    app_configs: Sequence[Any] | None = None, **kw: Any
) -> list[CheckMessage]:
    """E004: the Redis idempotency ledger has no Redis to use."""
    if conf.raw("IDEMPOTENCY_BACKEND") != "redis" or list(setting_errors()):
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
    app = core_checks.celery_app()
    url = app.conf.broker_url or ""
    if not isinstance(url, str) or url.split(":", 1)[0] not in core_checks.REDIS_SCHEMES:
        return []
    if list(core_checks.duration_errors(("DEDUP_WINDOW",))):
        return []  # E001 reports it; resolving the window would raise
    transport = app.conf.broker_transport_options or {}
    timeout = float(
        transport.get("visibility_timeout", core_checks.REDIS_DEFAULT_VISIBILITY_TIMEOUT)
    )
    short = []
    for task in core_checks.guarded_tasks(app):
        if keys.IDEMPOTENCY_KEY.resolve({}, task.guard_options) is None:
            continue
        window = keys.DEDUP_WINDOW.resolve({}, task.guard_options)
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


def check_lease_visibility(
    app_configs: Sequence[Any] | None = None, **kw: Any
) -> list[CheckMessage]:
    """W011: an idempotency lease not shorter than the Redis visibility timeout.

    A delivery that finds its key running under a live lease republishes itself with a
    countdown of the remaining lease; past the visibility timeout Redis delivers that
    unacknowledged ETA message again, in a loop, and ``doctor`` runs these checks too.
    """
    app = core_checks.celery_app()
    timeout = core_checks.redis_visibility_timeout(app)
    if timeout is None or list(setting_errors()):
        return []
    lease = conf.GuardSettings.seconds(conf.raw("IDEMPOTENCY_LEASE"))
    long = []
    for task in core_checks.guarded_tasks(app):
        if keys.IDEMPOTENCY_KEY.resolve({}, task.guard_options) is None:
            continue
        seconds = max(lease, float(task.time_limit or 0))  # as the worker computes it
        if seconds >= timeout:
            long.append(f"{task.name} ({seconds:g}s)")
    if not long:
        return []
    return [
        Warning(
            f"Idempotency lease not shorter than the Redis visibility_timeout ({timeout:g}s): "
            f"{', '.join(sorted(long))}.",
            hint=(
                "A delivery whose key is running elsewhere waits out the lease as an "
                "unacknowledged ETA message; past the visibility timeout Redis delivers it "
                "again (celery#3270, #2599). Lower CELERY_GUARD_IDEMPOTENCY_LEASE (and the "
                "task's time_limit) below the visibility timeout, or raise the timeout."
            ),
            id="celery_guard.W011",
        )
    ]


#: This feature's checks, in the order they are registered.
CHECKS: tuple[core_checks.Check, ...] = (
    check_setting_values,
    check_idempotency_redis,
    check_dedup_window,
    check_lease_visibility,
)
