"""System checks of the guarded beat: its settings, the lease length, the scheduler, USE_TZ,
Sentry cron monitors without sentry-sdk (W028)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from celery.utils.imports import symbol_by_name
from django.core.checks import CheckMessage, Error, Warning

from celery_guard import conf
from celery_guard.beat import slots
from celery_guard.core import checks as core_checks


def setting_errors() -> Iterable[str]:
    """Errors in the guarded beat's settings."""
    name = conf.raw("BEAT_LOCK_NAME")
    if not isinstance(name, str) or not name or len(name) > 200:
        yield f"CELERY_GUARD_BEAT_LOCK_NAME must be a non-empty str of <= 200 chars, got {name!r}"
    yield from core_checks.duration_errors(("BEAT_LEASE_SECONDS",))
    policies = conf.raw("BEAT_POLICIES")
    if not isinstance(policies, Mapping):
        yield f"CELERY_GUARD_BEAT_POLICIES must be a dict, got {type(policies).__name__}"
        return
    for entry, value in policies.items():
        try:
            slots.parse_policy(value)
        except (TypeError, ValueError) as exc:
            yield f"CELERY_GUARD_BEAT_POLICIES[{entry!r}]: {exc}"


check_setting_values = core_checks.setting_values_check(setting_errors)


def beat_max_loop_interval(app: Any) -> float:
    """The loop interval a guarded beat of ``app`` uses unless ``--max-interval`` overrides it."""
    from django_celery_beat.schedulers import DEFAULT_MAX_INTERVAL

    return float(app.conf.beat_max_loop_interval or DEFAULT_MAX_INTERVAL)


def check_beat_lease(app_configs: Sequence[Any] | None = None, **kw: Any) -> list[CheckMessage]:
    """E006: the beat lease is not at least twice as long as the beat loop interval."""
    if list(setting_errors()):
        return []
    lease = float(conf.raw("BEAT_LEASE_SECONDS"))
    interval = beat_max_loop_interval(core_checks.celery_app())
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
    scheduler = core_checks.celery_app().conf.beat_scheduler
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


#: Dotted path of the guarded scheduler (and of the base class of any subclass of it).
GUARDED_SCHEDULER = "celery_guard.beat.scheduler.GuardedScheduler"
#: E007's message; ``GuardedScheduler`` raises it too, for a beat started with ``-S``.
NAIVE_BEAT_MESSAGE = "USE_TZ is False, and the guarded beat stores and compares aware UTC times."
NAIVE_BEAT_HINT = (
    "Naive local times repeat when the clocks go back, so slots and last_run_at could not "
    "be kept unique and moving forward: the beat would crash or fire a slot twice. Set "
    "USE_TZ = True (Django's default), or use another beat scheduler."
)


def is_guarded_scheduler(scheduler: Any) -> bool:
    """Tell whether a ``beat_scheduler`` value (dotted path or class) is a ``GuardedScheduler``."""
    if isinstance(scheduler, str):
        try:
            scheduler = symbol_by_name(scheduler)
        except (ImportError, AttributeError, ValueError):
            return False
    return any(
        f"{cls.__module__}.{cls.__qualname__}" == GUARDED_SCHEDULER
        for cls in getattr(scheduler, "__mro__", ())
    )


def check_beat_use_tz(app_configs: Sequence[Any] | None = None, **kw: Any) -> list[CheckMessage]:
    """E007: the guarded beat is the beat scheduler and ``USE_TZ`` is off."""
    scheduler = core_checks.celery_app().conf.beat_scheduler
    if conf.guard_settings.use_tz or not is_guarded_scheduler(scheduler):
        return []
    return [Error(NAIVE_BEAT_MESSAGE, hint=NAIVE_BEAT_HINT, id="celery_guard.E007")]


def sentry_installed() -> bool:
    """Whether sentry-sdk can be imported."""
    try:
        import sentry_sdk  # noqa: F401
    except ImportError:
        return False
    return True


def check_sentry_monitors(
    app_configs: Sequence[Any] | None = None, **kw: Any
) -> list[CheckMessage]:
    """W028: a beat policy asks for Sentry cron check-ins, but sentry-sdk is not installed."""
    policies = conf.raw("BEAT_POLICIES")
    if not isinstance(policies, Mapping) or sentry_installed():
        return []
    monitored = [
        entry
        for entry, value in policies.items()
        if isinstance(value, Mapping) and value.get("sentry_monitor")
    ]
    if not monitored:
        return []
    return [
        Warning(
            f"CELERY_GUARD_BEAT_POLICIES sets sentry_monitor for {sorted(map(str, monitored))}, "
            "but sentry-sdk is not installed: no cron check-in is sent.",
            hint="Install the sentry extra (pip install celery-guard[sentry]) and call "
            "sentry_sdk.init in your settings, or remove sentry_monitor.",
            id="celery_guard.W028",
        )
    ]


#: This feature's checks, in the order they are registered.
CHECKS: tuple[core_checks.Check, ...] = (
    check_setting_values,
    check_beat_lease,
    check_beat_scheduler,
    check_beat_use_tz,
    check_sentry_monitors,
)
