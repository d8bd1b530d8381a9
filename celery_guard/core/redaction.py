"""Masking sensitive values in task arguments for display and logs (stored data untouched)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from django.utils.module_loading import import_string

from celery_guard.conf import guard_settings

logger = logging.getLogger(__name__)

#: What a masked value is shown as.
MASK = "********"


def _sensitive(key: str, fragments: Iterable[str]) -> bool:
    lowered = key.lower()
    return any(fragment.lower() in lowered for fragment in fragments)


def mask(value: Any, fragments: Iterable[str]) -> Any:
    """A copy of ``value`` whose mapping entries with a sensitive key are masked.

    A key is sensitive when one of ``fragments`` occurs in it, ignoring case
    (``"token"`` masks ``access_token`` and ``X-Token``). Nested lists and mappings are walked.
    """
    fragments = tuple(fragments)
    if isinstance(value, Mapping):
        return {
            key: MASK if _sensitive(str(key), fragments) else mask(item, fragments)
            for key, item in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [mask(item, fragments) for item in value]
    return value


def redact(args: Any, kwargs: Any, *, task_name: str = "") -> dict[str, Any]:
    """Masked ``{"args": ..., "kwargs": ...}`` for display or logging.

    Applies ``CELERY_GUARD_REDACT_FIELDS``, then the project hook ``CELERY_GUARD_REDACTOR``
    (a dotted path to ``hook(data, task_name=...) -> data``). A hook that cannot be imported
    or raises masks everything: failing closed is the safe side for secrets.
    """
    fragments = guard_settings.redact_fields
    # Arguments that were not JSON are stored as their repr (a string): nothing in it can be
    # told apart, so it is masked whole.
    data: dict[str, Any] = {
        "args": mask(args, fragments) if isinstance(args, (list, tuple)) else MASK,
        "kwargs": mask(kwargs, fragments) if isinstance(kwargs, Mapping) else MASK,
    }
    path = guard_settings.redactor
    if not path:
        return data
    try:
        hook = import_string(path)
        result = hook(data, task_name=task_name)
        if not isinstance(result, Mapping) or set(result) != {"args", "kwargs"}:
            raise TypeError(f"returned {type(result).__name__}, not {{'args', 'kwargs'}}")
    except Exception:
        logger.exception(
            "celery_guard: the redactor CELERY_GUARD_REDACTOR=%r failed for %s; masking all "
            "arguments",
            path,
            task_name,
        )
        return {"args": MASK, "kwargs": MASK}
    return dict(result)
