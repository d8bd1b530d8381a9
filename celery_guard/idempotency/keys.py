"""Idempotency keys: the options, key derivation from a call's arguments, the identity."""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import re
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from celery_guard import durations
from celery_guard.conf import guard_settings
from celery_guard.core import options
from celery_guard.exceptions import IdempotencyKeyError

logger = logging.getLogger(__name__)

#: Name of the entry of the guard header that carries a call's idempotency identity.
HEADER_FIELD = "idempotency"

#: Characters a key may carry verbatim; anything else (spaces, broker or glob pattern
#: characters like ``* ? [ ] #``) makes that part hashed.
_SAFE = re.compile(r"[A-Za-z0-9_.:@=+,-]+")
_SAFE_TASK_NAME = re.compile(r"[A-Za-z0-9_.@-]+")
#: The ledger's key column holds 200 characters.
MAX_KEY_LENGTH = 200
_MAX_TASK_NAME = 100


@dataclass(frozen=True, eq=False)
class KeySpec:
    """A decorator's ``idempotency_key``, checked against the task's signature.

    Attributes:
        source: The template string, or the callable that returns the key.
        fields: The argument names the template uses (empty for a callable).
    """

    source: str | Callable[..., Any]
    fields: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return f"KeySpec({self.source!r})"


def _template_fields(template: str) -> tuple[str, ...]:
    fields: list[str] = []
    for _, name, _, _ in string.Formatter().parse(template):
        if name is None:
            continue
        root = re.split(r"[.\[]", name, maxsplit=1)[0]
        if not root or root.isdigit():
            raise ValueError(
                f"template {template!r} uses a positional field {{{name}}}; "
                "name the task's arguments, e.g. 'notify:{employee_id}'"
            )
        fields.append(root)
    return tuple(dict.fromkeys(fields))


def _validate_key(value: Any) -> Any:
    if isinstance(value, KeySpec):
        return value
    if isinstance(value, str):
        if not value.strip():
            raise ValueError("must not be empty")
        _template_fields(value)
        return value
    if callable(value):
        return value
    raise TypeError(
        f"expected a key template (str) or a callable taking the task's arguments, "
        f"got {type(value).__name__}"
    )


def _task_parameters(fn: Callable[..., Any], bind: bool) -> list[inspect.Parameter]:
    params = list(inspect.signature(fn).parameters.values())
    return params[1:] if bind and params else params


def _check_callable(func: Callable[..., Any], params: list[inspect.Parameter]) -> None:
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):
        return  # a builtin without a signature: checked when it is called
    names = [p.name for p in params if p.kind is not p.VAR_KEYWORD]
    try:
        signature.bind(**dict.fromkeys(names))
    except TypeError as exc:
        raise ValueError(
            f"callable {getattr(func, '__qualname__', func)!r} must accept the task's "
            f"arguments as keywords ({', '.join(names)}): {exc}"
        ) from None


def _key_for_function(value: Any, fn: Callable[..., Any], bind: bool) -> KeySpec:
    if isinstance(value, KeySpec):
        return value
    params = _task_parameters(fn, bind)
    if not isinstance(value, str):
        _check_callable(value, params)
        return KeySpec(value)
    fields = _template_fields(value)
    names = {p.name for p in params if p.kind is not p.VAR_KEYWORD}
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return KeySpec(value, fields)  # any field may come through **kwargs
    unknown = [f for f in fields if f not in names]
    if unknown:
        raise ValueError(
            f"template {value!r} uses {', '.join(map(repr, unknown))}, which "
            f"{'is not a parameter' if len(unknown) == 1 else 'are not parameters'} of "
            f"{fn.__qualname__}({', '.join(p.name for p in params)})"
            f"{options.suggest(unknown[0], names)}"
        )
    return KeySpec(value, fields)


def _validate_window(value: Any) -> float:
    return durations.seconds(value)


def _validate_conflict(value: Any) -> str:
    if value not in ("raise", "ignore"):
        raise ValueError(f"expected 'raise' or 'ignore', got {value!r}")
    return str(value)


IDEMPOTENCY_KEY = options.GuardOption(
    name="idempotency_key",
    validate=_validate_key,
    for_function=_key_for_function,
)
DEDUP_WINDOW = options.GuardOption(
    name="dedup_window", validate=_validate_window, setting="DEDUP_WINDOW"
)
IDEMPOTENCY_CONFLICT = options.GuardOption(
    name="idempotency_conflict", validate=_validate_conflict, default="raise"
)


def bind_arguments(
    task: Any, args: Sequence[Any] | None, kwargs: Mapping[str, Any] | None
) -> dict[str, Any]:
    """Bind a call's arguments to the task's parameters, defaults applied.

    ``**kwargs`` parameters are flattened in, so a template can name their entries.

    Raises:
        IdempotencyKeyError: The arguments do not fit the task's signature.
    """
    # ``task.run`` is a bound method for ``bind=True`` tasks, so ``self`` is not a parameter.
    signature = inspect.signature(task.run)
    try:
        bound = signature.bind(*(args or ()), **(kwargs or {}))
    except TypeError as exc:
        raise IdempotencyKeyError(
            f"{task.name}: cannot derive the idempotency key: {exc}"
        ) from None
    bound.apply_defaults()
    arguments: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            arguments.update(value)
        else:
            arguments[name] = value
    return arguments


def derive(task_name: str, spec: Any, arguments: Mapping[str, Any]) -> str:
    """Return the namespaced key of a call (see :func:`namespaced`).

    Args:
        task_name: The task's name (the key's namespace).
        spec: A :class:`KeySpec` (template or callable), or a literal key (per call).
        arguments: The call's bound arguments (:func:`bind_arguments`).

    Raises:
        IdempotencyKeyError: A template value is missing (or ``None``/empty), or the key is
            empty or not a string.
    """
    if isinstance(spec, str):
        raw: Any = spec
    elif isinstance(spec, KeySpec) and isinstance(spec.source, str):
        missing = [f for f in spec.fields if arguments.get(f) in (None, "")]
        if missing:
            raise IdempotencyKeyError(
                f"{task_name}: idempotency key template {spec.source!r} has no value for "
                f"{', '.join(map(repr, missing))}"
            )
        try:
            raw = spec.source.format_map(arguments)
        except (AttributeError, IndexError, KeyError, TypeError, ValueError) as exc:
            raise IdempotencyKeyError(
                f"{task_name}: idempotency key template {spec.source!r}: {exc!r}"
            ) from None
    else:
        func: Callable[..., Any] = spec.source if isinstance(spec, KeySpec) else spec  # type: ignore[assignment]
        raw = func(**arguments)
    if isinstance(raw, int) and not isinstance(raw, bool):
        raw = str(raw)
    if not isinstance(raw, str):
        raise IdempotencyKeyError(
            f"{task_name}: the idempotency key must be a str, got {type(raw).__name__}"
        )
    if not raw.strip():
        raise IdempotencyKeyError(f"{task_name}: the idempotency key is empty")
    return namespaced(task_name, raw)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def namespaced(task_name: str, raw: str) -> str:
    """Return ``<task name>:<raw key>``, hashing the parts that are long or unsafe.

    A hashed part is ``#<sha256>``; ``#`` never appears in a verbatim part and ``:`` never in
    a verbatim task name, so keys of different tasks, hashed or not, cannot collide.
    """
    prefix = task_name
    if len(task_name) > _MAX_TASK_NAME or not _SAFE_TASK_NAME.fullmatch(task_name):
        prefix = "#" + _sha256(task_name)[:32]
    body = raw
    if len(prefix) + 1 + len(raw) > MAX_KEY_LENGTH or not _SAFE.fullmatch(raw):
        body = "#" + _sha256(raw)
    return f"{prefix}:{body}"


def fingerprint(arguments: Mapping[str, Any]) -> str:
    """Return the sha256 of the canonical JSON of a call's bound arguments."""
    text = json.dumps(arguments, sort_keys=True, separators=(",", ":"), default=repr)
    return _sha256(text)


@dataclass(frozen=True)
class Identity:
    """What the guard header carries about a call with an idempotency key."""

    key: str
    fingerprint: str
    window: float
    on_conflict: str = "raise"

    def header(self) -> dict[str, Any]:
        """Return the header entry (``celery_guard.idempotency.dedup``)."""
        return {
            "key": self.key,
            "fingerprint": self.fingerprint,
            "window": self.window,
            "on_conflict": self.on_conflict,
        }

    @classmethod
    def from_header(cls, guard_header: Mapping[str, Any]) -> Identity | None:
        """Read the identity a message carries, or ``None``."""
        entry = guard_header.get(HEADER_FIELD)
        if not isinstance(entry, Mapping) or not entry.get("key"):
            return None
        return cls(
            key=str(entry["key"]),
            fingerprint=str(entry.get("fingerprint", "")),
            window=float(entry.get("window") or guard_settings.dedup_window),
            on_conflict=str(entry.get("on_conflict", "raise")),
        )


def identify(
    task: Any,
    args: Sequence[Any] | None,
    kwargs: Mapping[str, Any] | None,
    per_call: Mapping[str, Any],
    inherited: Mapping[str, Any] | None = None,
) -> Identity | None:
    """Return the idempotency identity of a call, or ``None`` when it has no key.

    A republish (a Celery retry) keeps the identity its message carries, unless this call
    names another key.

    Raises:
        IdempotencyKeyError: The key cannot be derived from the arguments.
    """
    if inherited and "idempotency_key" not in per_call:
        kept = Identity.from_header(inherited)
        if kept is not None:
            return kept
    spec = IDEMPOTENCY_KEY.resolve(per_call, task.guard_options)
    if spec is None:
        return None
    arguments = bind_arguments(task, args, kwargs)
    window = DEDUP_WINDOW.resolve(per_call, task.guard_options)
    return Identity(
        key=derive(task.name, spec, arguments),
        fingerprint=fingerprint(arguments),
        window=_validate_window(window),
        on_conflict=IDEMPOTENCY_CONFLICT.resolve(per_call, task.guard_options),
    )
