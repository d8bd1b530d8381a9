"""System checks of priority routing: the level map, declared queues, the router."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from django.core.checks import CheckMessage, Error, Warning

from celery_guard import conf
from celery_guard.core import checks as core_checks
from celery_guard.routing import router


def setting_errors() -> Iterable[str]:
    """Errors in the routing settings."""
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
    if not isinstance(conf.raw("INSTALL_ROUTER"), bool):
        yield "CELERY_GUARD_INSTALL_ROUTER must be True or False"


check_setting_values = core_checks.setting_values_check(setting_errors)


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
    if list(setting_errors()):
        return []
    app = core_checks.celery_app()
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
    if conf.raw("INSTALL_ROUTER") is not False or router.is_installed(core_checks.celery_app()):
        return []
    return [
        Warning(
            "CELERY_GUARD_INSTALL_ROUTER is False and task_routes does not list "
            f"{router.ROUTER_PATH!r}.",
            hint="Guarded tasks are not routed by priority; add the router to CELERY_TASK_ROUTES.",
            id="celery_guard.W006",
        )
    ]


#: This feature's checks, in the order they are registered.
CHECKS: tuple[core_checks.Check, ...] = (
    check_setting_values,
    check_priority_queues,
    check_router,
)
