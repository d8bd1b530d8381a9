"""Enqueue-time payload checks: guarded arguments are plain JSON and bounded in size."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from celery_guard.exceptions import PayloadError

_SCALARS = (int, bool, type(None))
#: ``json.dumps(..., separators=...)`` would build an encoder on every call.
_ENCODER = json.JSONEncoder(separators=(",", ":"))


def _no_nul(text: str, path: str, refuse: bool) -> None:
    # PostgreSQL text and jsonb cannot hold U+0000 (see check's refuse_nul).
    if refuse and "\x00" in text:
        raise PayloadError(
            f"{path}: contains a NUL character (\\x00), which the database cannot store"
        )


def _walk(value: Any, path: str, depth: int, nul: bool) -> None:
    # Plain JSON only: Celery's serializer would accept datetimes or Decimals and hand back
    # other types on the worker, and the stored arguments must replay as they were sent.
    if isinstance(value, str):
        _no_nul(value, path, nul)
        return
    if isinstance(value, _SCALARS):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise PayloadError(f"{path}: {value!r} is not valid JSON (NaN and infinities are not)")
        return
    if depth > 100:
        raise PayloadError(f"{path}: nested more than 100 levels deep (or circular)")
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise PayloadError(
                    f"{path}: dict key {key!r} is {type(key).__name__}; JSON object keys "
                    "are strings, and the worker would receive it as one"
                )
            _no_nul(key, f"{path}: dict key {key!r}", nul)
            _walk(item, f"{path}[{key!r}]", depth + 1, nul)
        return
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _walk(item, f"{path}[{index}]", depth + 1, nul)
        return
    raise PayloadError(f"{path}: {type(value).__name__} is not JSON serializable")


def check(
    args: Sequence[Any] | None,
    kwargs: Mapping[str, Any] | None,
    *,
    max_bytes: int,
    refuse_nul: bool = False,
) -> int:
    """Check that a task's arguments can be published as plain JSON within ``max_bytes``.

    Args:
        args: Positional arguments as passed to ``apply_async``.
        kwargs: Keyword arguments as passed to ``apply_async``.
        max_bytes: Largest accepted size of the JSON-encoded ``[args, kwargs]``.
        refuse_nul: Also refuse NUL characters in strings and keys. Enqueue accepts them
            (a dead letter stores them escaped, docs/failures.md); arguments that are
            stored as they are (an edit-and-replay's replay record) must not hold one.

    Returns:
        The encoded size in bytes.

    Raises:
        PayloadError: Naming the argument path of the first value that is not plain JSON,
            or giving the size when the payload is too large.
    """
    args = () if args is None else args
    kwargs = {} if kwargs is None else kwargs
    if not isinstance(args, (list, tuple)):
        raise PayloadError(f"args: expected a list or tuple, got {type(args).__name__}")
    # An exact dict first: the Mapping ABC check costs more than the rest of a small call's.
    if type(kwargs) is not dict and not isinstance(kwargs, Mapping):
        raise PayloadError(f"kwargs: expected a dict, got {type(kwargs).__name__}")
    for index, item in enumerate(args):
        _walk(item, f"args[{index}]", 1, refuse_nul)
    for key, item in kwargs.items():
        if isinstance(key, str):
            _no_nul(key, f"kwargs: key {key!r}", refuse_nul)
        _walk(item, f"kwargs[{key!r}]", 1, refuse_nul)
    # ASCII (ensure_ascii), so its length in characters is its size in bytes.
    size = len(_ENCODER.encode([args, kwargs]))
    if size > max_bytes:
        raise PayloadError(
            f"payload is {size} bytes, over CELERY_GUARD_MAX_PAYLOAD_BYTES ({max_bytes}); "
            "pass a reference (a primary key, a storage path) instead of the data"
        )
    return size


#: Longest JSON text of a finite float (``repr``), e.g. ``-2.2250738585072014e-308``.
_FLOAT_CHARS = 24
#: ``[[...],{...}]``: the brackets and braces of the encoded ``[args, kwargs]``.
_FRAME_CHARS = 7


def _scalar_bound(value: Any) -> int:
    """An upper bound of the JSON size of a plain scalar; -1 for anything else.

    A string's character may take 12 bytes (a surrogate pair of ``\\uXXXX`` escapes); the
    caller then needs no exact encoding when the bounds add up to less than the limit.
    """
    kind = type(value)
    if kind is str:
        return 12 * len(value) + 3  # quotes, comma
    if kind is int:
        bits: int = value.bit_length()
        return bits * 10 // 33 + 3  # digits (log10 2 < 10/33), sign, comma
    if kind is bool or value is None:
        return 6
    if kind is float and math.isfinite(value):
        return _FLOAT_CHARS + 1
    return -1


def refuse(args: Sequence[Any] | None, kwargs: Mapping[str, Any] | None, *, max_bytes: int) -> None:
    """:func:`check` for a publish, which needs no size back: the same refusals, quicker.

    A call whose arguments are all plain scalars (strings, numbers, booleans, None) under
    plain string keys is admitted from an upper bound of its size, with no JSON encoding,
    when that bound is within ``max_bytes``; anything else goes through :func:`check`.

    Raises:
        PayloadError: As :func:`check`.
    """
    if (args is None or type(args) is tuple or type(args) is list) and (
        kwargs is None or type(kwargs) is dict
    ):
        total = _FRAME_CHARS
        for item in args or ():
            bound = _scalar_bound(item)
            if bound < 0:
                break
            total += bound
        else:
            for key, item in (kwargs or {}).items():
                bound = _scalar_bound(item)
                if bound < 0 or type(key) is not str:
                    break
                total += bound + 12 * len(key) + 3
            else:
                if total <= max_bytes:
                    return
    check(args, kwargs, max_bytes=max_bytes)
