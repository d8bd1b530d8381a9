"""celery_guard: enterprise controls for Celery tasks in Django projects."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "GuardError",
    "GuardedTask",
    "HardTimeLimitError",
    "IdempotencyConflict",
    "IdempotencyKeyError",
    "InvalidHeaderError",
    "LeaseLost",
    "PayloadError",
    "PermanentError",
    "PoisonMessageError",
    "RepublishError",
    "RunItemError",
    "ThrottledError",
    "TransientError",
    "__version__",
    "guarded_task",
    "start_run",
]

from celery_guard.exceptions import (
    GuardError,
    HardTimeLimitError,
    IdempotencyConflict,
    IdempotencyKeyError,
    InvalidHeaderError,
    LeaseLost,
    PayloadError,
    PermanentError,
    PoisonMessageError,
    RepublishError,
    RunItemError,
    ThrottledError,
    TransientError,
)

if TYPE_CHECKING:
    from celery_guard.decorators import guarded_task
    from celery_guard.runs.launch import start_run
    from celery_guard.task import GuardedTask


def __getattr__(name: str) -> Any:
    # The decorator and the task class import Celery and Django; loading them lazily keeps
    # `import celery_guard` cheap and safe before Django's settings are configured.
    if name == "guarded_task":
        from celery_guard.decorators import guarded_task

        return guarded_task
    if name == "start_run":
        from celery_guard.runs.launch import start_run

        return start_run
    if name == "GuardedTask":
        from celery_guard.task import GuardedTask

        return GuardedTask
    raise AttributeError(f"module 'celery_guard' has no attribute {name!r}")
