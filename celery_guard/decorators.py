"""``@guarded_task``: a ``shared_task`` with guard options validated at decoration time."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, overload

from celery import Task, shared_task

from celery_guard.core.options import OptionSet, suggest
from celery_guard.task import GuardedTask

# Keywords Celery's task decorators take that are not attributes of ``Task``.
_CELERY_DECORATOR_KEYWORDS = frozenset(
    {
        "name",
        "base",
        "bind",
        "shared",
        "lazy",
        "filter",
        "autoretry_for",
        "dont_autoretry_for",
        "retry_kwargs",
        "retry_backoff",
        "retry_backoff_max",
        "retry_jitter",
        "pydantic",
        "pydantic_strict",
        "pydantic_context",
        "pydantic_dump_kwargs",
    }
)


def _celery_options() -> frozenset[str]:
    public = {name for name in dir(Task) if not name.startswith("_")}
    return frozenset(public) | _CELERY_DECORATOR_KEYWORDS


def _split(opts: dict[str, Any], guard_options: OptionSet) -> tuple[dict[str, Any], dict[str, Any]]:
    guard_names = guard_options.names()
    celery_names = _celery_options()
    guard: dict[str, Any] = {}
    celery: dict[str, Any] = {}
    for name, value in opts.items():
        if name in guard_names:
            guard[name] = value
        elif name in celery_names:
            celery[name] = value
        else:
            hint = suggest(name, [*guard_names, *celery_names])
            raise TypeError(
                f"@guarded_task: unknown option {name!r}{hint}; it is neither a guard option "
                "nor a Celery task option"
            )
    return guard, celery


@overload
def guarded_task(func: Callable[..., Any], /) -> GuardedTask: ...


@overload
def guarded_task(**opts: Any) -> Callable[[Callable[..., Any]], GuardedTask]: ...


def guarded_task(
    func: Callable[..., Any] | None = None, /, **opts: Any
) -> GuardedTask | Callable[[Callable[..., Any]], GuardedTask]:
    """Declare a guarded Celery task; use with or without parentheses.

    Takes every option Celery's ``shared_task`` takes, plus the guard options of the
    pipeline's steps (``celery_guard.steps``: ``priority``...). Options are validated here,
    so a mistake fails when the module is imported, not in the worker.

    Example:
        >>> @guarded_task(priority="high")
        ... def send_password_reset(user_id: int) -> None: ...

    Raises:
        TypeError: An option is unknown, or has the wrong type.
        ValueError: An option has a value out of its range.
    """
    base = opts.pop("base", GuardedTask)
    if not (isinstance(base, type) and issubclass(base, GuardedTask)):
        raise TypeError("@guarded_task option 'base': must be a subclass of GuardedTask")
    guard_options = base.guard_pipeline.options
    guard, celery = _split(opts, guard_options)
    cleaned = guard_options.clean(guard, where="@guarded_task")
    serializer = celery.get("serializer", "json")
    if serializer != "json":
        raise ValueError(
            f"@guarded_task option 'serializer': guarded tasks publish JSON, not {serializer!r}"
        )

    def decorate(fn: Callable[..., Any]) -> GuardedTask:
        if not callable(fn):
            raise TypeError(f"@guarded_task: expected a function, got {type(fn).__name__}")
        bound = guard_options.bind_to_function(
            cleaned, fn, bind=bool(celery.get("bind")), where="@guarded_task"
        )
        base.guard_pipeline.check(bound, where="@guarded_task")
        task: GuardedTask = shared_task(base=base, guard_options=bound, **celery)(fn)
        return task

    return decorate(func) if func is not None else decorate
