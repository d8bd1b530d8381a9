"""Masking sensitive values in task arguments, and wherever they appear in free text.

The stored arguments stay as they were sent (a replay needs them); what is masked is their
display, the logs, and the free text of a failure (exception message, traceback, attempt
history), which is masked before it is stored or logged.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from celery import current_app
from django.utils.module_loading import import_string

from celery_guard.conf import guard_settings

logger = logging.getLogger(__name__)

#: What a masked value is shown as.
MASK = "********"
#: Shortest argument value masked in free text: a shorter one ("1", "yes") would mask every
#: occurrence of it in unrelated text, and the masks would give its value away.
MIN_SECRET_LENGTH = 4


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


def _positional_names(task_name: str) -> list[str]:
    """The names the task's positional parameters bind to (empty when the task is unknown)."""
    task = current_app.tasks.get(task_name) if task_name else None
    try:
        # ``run`` is bound for ``bind=True`` tasks: ``self`` is not among the parameters.
        parameters = inspect.signature(task.run).parameters.values() if task else ()
    except (TypeError, ValueError):
        return []
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    names = []
    for parameter in parameters:
        if parameter.kind not in positional:
            break
        names.append(parameter.name)
    return names


def _mask_args(args: Any, fragments: tuple[str, ...], task_name: str) -> list[Any]:
    # A secret passed positionally is masked by the name of the parameter it binds to.
    names = _positional_names(task_name)
    return [
        MASK
        if index < len(names) and _sensitive(names[index], fragments)
        else mask(item, fragments)
        for index, item in enumerate(args)
    ]


def redact(args: Any, kwargs: Any, *, task_name: str = "") -> dict[str, Any]:
    """Masked ``{"args": ..., "kwargs": ...}`` for display or logging.

    Applies ``CELERY_GUARD_REDACT_FIELDS`` to the keyword arguments and to the positional
    ones by the name of the task parameter they bind to, then the project hook
    ``CELERY_GUARD_REDACTOR`` (a dotted path to ``hook(data, task_name=...) -> data``). A hook
    that cannot be imported or raises masks everything: failing closed is the safe side for
    secrets.
    """
    fragments = tuple(guard_settings.redact_fields)
    # Arguments that were not JSON are stored as their repr (a string): nothing in it can be
    # told apart, so it is masked whole.
    data: dict[str, Any] = {
        "args": _mask_args(args, fragments, task_name) if isinstance(args, (list, tuple)) else MASK,
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


def _leaves(value: Any) -> Iterator[str]:
    if isinstance(value, Mapping):
        for item in value.values():
            yield from _leaves(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _leaves(item)
    elif isinstance(value, (str, int, float)) and not isinstance(value, bool):
        yield str(value)


def _masked_values(real: Any, shown: Any) -> Iterator[str]:
    """The values of ``real`` that its redacted form ``shown`` does not show."""
    if isinstance(real, Mapping) and isinstance(shown, Mapping):
        for key, item in real.items():
            yield from _masked_values(item, shown.get(key, MASK))
    elif (
        isinstance(real, (list, tuple))
        and isinstance(shown, (list, tuple))
        and len(real) == len(shown)
    ):
        for item, shown_item in zip(real, shown, strict=True):
            yield from _masked_values(item, shown_item)
    elif real != shown:
        yield from _leaves(real)


def secrets(args: Any, kwargs: Any, *, task_name: str = "") -> frozenset[str]:
    """The argument values that :func:`redact` masks (the field rules and the hook alike).

    Every value the redaction does not show as it is counts, so a project hook that masks
    an argument also masks it in free text. Values shorter than :data:`MIN_SECRET_LENGTH`
    are left out (see there).
    """
    shown = redact(args, kwargs, task_name=task_name)
    found = {*_masked_values(args, shown["args"]), *_masked_values(kwargs, shown["kwargs"])}
    return frozenset(value for value in found if len(value) >= MIN_SECRET_LENGTH)


def mask_text(text: str, values: Iterable[str]) -> str:
    """``text`` with each of ``values`` masked, also as ``repr`` and JSON would escape it."""
    forms = {
        form for value in values for form in (value, repr(value)[1:-1], json.dumps(value)[1:-1])
    }
    # Longest first: a secret that contains another is masked whole.
    for form in sorted((f for f in forms if len(f) >= MIN_SECRET_LENGTH), key=len, reverse=True):
        text = text.replace(form, MASK)
    return text


def scrub_exception(exc: BaseException, values: Iterable[str]) -> None:
    """Mask ``values`` in the string arguments of ``exc`` and the exceptions chained to it.

    In place, so that everything that formats the exception afterwards (the attempt
    history, Celery's own failure and retry log lines, the result backend, error trackers)
    sees the masked text. Exceptions whose text does not come from their arguments are
    masked where celery_guard stores their text only.
    """
    values = frozenset(values)
    if not values:
        return
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if any(isinstance(arg, str) for arg in current.args):
            # An exception type that does not let its args be set keeps them.
            with contextlib.suppress(AttributeError, TypeError):
                current.args = tuple(
                    mask_text(arg, values) if isinstance(arg, str) else arg for arg in current.args
                )
        current = current.__cause__ or current.__context__
