"""Priority routing: the ``priority`` guard option and a Celery router that maps it to a queue."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from celery_guard import conf
from celery_guard.conf import guard_settings
from celery_guard.core import headers, options

logger = logging.getLogger(__name__)

#: Dotted path of the router, as it appears in ``task_routes``.
ROUTER_PATH = "celery_guard.routing.route_task"


def _validate_priority(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(
            f"expected a priority level name (str), got {type(value).__name__}; "
            "a numeric broker priority is passed per call: apply_async(priority=N)"
        )
    # Settings may not be configured yet when a task module is imported on its own; the level
    # is checked again when a message is routed.
    if conf.configured():
        levels = guard_settings.priority_queues
        if value not in levels:
            raise ValueError(
                f"{value!r} is not a priority level; CELERY_GUARD_PRIORITY_QUEUES defines "
                f"{', '.join(repr(k) for k in levels)}{options.suggest(value, levels)}"
            )
    return value


PRIORITY = options.GuardOption(
    name="priority",
    validate=_validate_priority,
    setting="DEFAULT_PRIORITY",
)


def queue_for(level: str) -> str:
    """Return the queue of a priority level.

    Raises:
        ValueError: ``level`` is not a key of ``CELERY_GUARD_PRIORITY_QUEUES``.
    """
    levels = guard_settings.priority_queues
    try:
        return levels[level]
    except KeyError:
        raise ValueError(
            f"priority level {level!r} is not in CELERY_GUARD_PRIORITY_QUEUES "
            f"({', '.join(repr(k) for k in levels)})"
        ) from None


def route_task(
    name: str,
    args: Any,
    kwargs: Any,
    options: Mapping[str, Any],
    task: Any = None,
    **kw: Any,
) -> dict[str, str] | None:
    """Celery router: send a guarded message to the queue of its priority level.

    The level is read from the guard header that :class:`~celery_guard.task.GuardedTask`
    stamps, so a message published through ``send_task`` with that header (a replay) routes
    the same way. Messages without it (unguarded tasks) are left to the next router.
    """
    level = headers.read(options.get("headers")).get("priority")
    if level is None:
        return None
    queue = queue_for(level)
    logger.debug("celery_guard: routing %s to queue %r (priority %r)", name, queue, level)
    return {"queue": queue}


def is_installed(app: Any) -> bool:
    """Tell whether ``app.conf.task_routes`` contains the guard router."""
    routes = app.conf.task_routes
    if routes is None or isinstance(routes, (dict, str)) or callable(routes):
        routes = [routes]
    return any(r is route_task or r == ROUTER_PATH for r in routes)


def install(app: Any) -> None:
    """Put the guard router in front of ``app.conf.task_routes`` (idempotent).

    The user's own routes stay in place after it: the guard router returns ``None`` for
    every message without a guard priority, so they keep routing unguarded tasks.
    """
    if is_installed(app):
        return
    routes = app.conf.task_routes
    if routes is None:
        existing: list[Any] = []
    elif isinstance(routes, (list, tuple)):
        existing = list(routes)
    else:
        existing = [routes]
    app.conf.task_routes = (ROUTER_PATH, *existing)
    # Celery caches the prepared route table; rebuild it so a router created before this
    # call sees the guard router too.
    app.amqp.flush_routes()
    app.amqp.__dict__.pop("router", None)
