"""System checks of the failure pipeline: retry settings, acks, visibility, the classifier."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from django.core.checks import CheckMessage, Error, Warning
from django.utils.module_loading import import_string

from celery_guard import backoff, conf
from celery_guard.core import checks as core_checks
from celery_guard.failures import retry


def setting_errors() -> Iterable[str]:
    """Errors in the failure pipeline's settings."""
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
    for name, minimum in (
        ("MAX_THROTTLED", 0),
        ("MAX_WORKER_LOST", 1),
        ("DEAD_LETTER_WRITE_TRIES", 1),
    ):
        value = conf.raw(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            yield f"CELERY_GUARD_{name} must be an int >= {minimum}, got {value!r}"
    yield from core_checks.duration_errors(("SOFT_TIME_LIMIT", "TIME_LIMIT"))
    if not isinstance(conf.raw("CAPTURE_UNGUARDED"), bool):
        yield "CELERY_GUARD_CAPTURE_UNGUARDED must be True or False"


check_setting_values = core_checks.setting_values_check(setting_errors)


def check_acks_late(app_configs: Sequence[Any] | None = None, **kw: Any) -> list[CheckMessage]:
    """W002: ``task_acks_late`` without ``task_reject_on_worker_lost``."""
    conf_ = core_checks.celery_app().conf
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


def _longest_run(app: Any) -> tuple[float, str] | None:
    candidates: list[tuple[float, str]] = []
    for name in ("task_time_limit", "task_soft_time_limit"):
        value = app.conf.get(name)
        if value:
            candidates.append((float(value), f"CELERY_{name.upper()}"))
    for task in core_checks.guarded_tasks(app):
        for attr in ("time_limit", "soft_time_limit"):
            value = getattr(task, attr, None)
            if value:
                candidates.append((float(value), f"{task.name}.{attr}"))
    return max(candidates) if candidates else None


def check_visibility_timeout(
    app_configs: Sequence[Any] | None = None, **kw: Any
) -> list[CheckMessage]:
    """W003: a Redis broker whose visibility timeout is not longer than a guarded task may run."""
    app = core_checks.celery_app()
    timeout = core_checks.redis_visibility_timeout(app)
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
    """W008: a Redis visibility timeout not longer than a guarded task's longest retry delay.

    Only without the delivery schedule (``CELERY_GUARD_SCHEDULE = None``): with it, a retry
    waits in the schedule, not unacknowledged in a worker, and reaches its queue when due.
    """
    if conf.raw("SCHEDULE") is not None:
        return []
    app = core_checks.celery_app()
    timeout = core_checks.redis_visibility_timeout(app)
    if timeout is None or list(setting_errors()):
        return []
    default = conf.raw("BACKOFF")
    delays = sorted(
        (retry.longest_delay(task.guard_options, default), task.name)
        for task in core_checks.guarded_tasks(app)
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


#: This feature's checks, in the order they are registered.
CHECKS: tuple[core_checks.Check, ...] = (
    check_setting_values,
    check_acks_late,
    check_visibility_timeout,
    check_retry_delay_visibility,
    check_classifier,
)
