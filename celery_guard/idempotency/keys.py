"""Idempotency keys: the options, key derivation from a call's arguments, the identity."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from celery_guard import durations
from celery_guard.conf import guard_settings
from celery_guard.core import options, templates
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


#: A decorator's ``idempotency_key`` checked against the task's signature.
KeySpec = templates.TemplateSpec


def _validate_window(value: Any) -> float:
    return durations.seconds(value)


def _validate_conflict(value: Any) -> str:
    if value not in ("raise", "ignore"):
        raise ValueError(f"expected 'raise' or 'ignore', got {value!r}")
    return str(value)


IDEMPOTENCY_KEY = options.GuardOption(
    name="idempotency_key",
    validate=templates.validate,
    for_function=templates.for_function,
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
    """Bind a call's arguments to the task's parameters (:func:`templates.bind_arguments`).

    Raises:
        IdempotencyKeyError: The arguments do not fit the task's signature.
    """
    try:
        return templates.bind_arguments(task, args, kwargs)
    except TypeError as exc:
        raise IdempotencyKeyError(
            f"{task.name}: cannot derive the idempotency key: {exc}"
        ) from None


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
    try:
        raw = templates.render(spec, arguments)
    except ValueError as exc:
        what = "idempotency key" if str(exc).startswith("template") else "the idempotency key"
        raise IdempotencyKeyError(f"{task_name}: {what} {exc}") from None
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


#: The canonical JSON of a fingerprint; ``json.dumps`` with these options would build an
#: encoder on every keyed publish and run.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), default=repr)


def fingerprint(arguments: Mapping[str, Any]) -> str:
    """Return the sha256 of the canonical JSON of a call's bound arguments."""
    return _sha256(_CANONICAL.encode(arguments))


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
        # None (no key, every routing-only publish) before the Mapping ABC check.
        if entry is None or not isinstance(entry, Mapping) or not entry.get("key"):
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
        # Every source of the window validated it (decorator, guard=..., settings).
        window=window if type(window) is float else _validate_window(window),
        on_conflict=IDEMPOTENCY_CONFLICT.resolve(per_call, task.guard_options),
    )
