"""Argument templates: ``"notify:{employee_id}"`` or a callable, checked and rendered.

The idempotency key and the limits' tenant are both derived from a call's arguments. The
template is validated at decoration time against the task's signature (an unknown field fails
at import) and rendered at enqueue from the call's bound arguments.
"""

from __future__ import annotations

import functools
import inspect
import re
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from celery_guard.core import options


@dataclass(frozen=True, eq=False)
class TemplateSpec:
    """A decorator's template, checked against the task's signature.

    Attributes:
        source: The template string, or the callable that returns the value.
        fields: The argument names the template uses (empty for a callable).
    """

    source: str | Callable[..., Any]
    fields: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.source!r})"


def template_fields(template: str) -> tuple[str, ...]:
    """The argument names a template uses.

    Raises:
        ValueError: The template uses a positional field (``{0}``, ``{}``).
    """
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


def validate(value: Any) -> Any:
    """Validate a template option's value: a non-empty template string or a callable."""
    if isinstance(value, TemplateSpec):
        return value
    if isinstance(value, str):
        if not value.strip():
            raise ValueError("must not be empty")
        template_fields(value)
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


def for_function(value: Any, fn: Callable[..., Any], bind: bool) -> TemplateSpec:
    """Check a validated template against the task function; return its spec.

    Raises:
        ValueError: The template names a field that is not a parameter, or the callable does
            not accept the task's arguments.
    """
    if isinstance(value, TemplateSpec):
        return value
    params = _task_parameters(fn, bind)
    if not isinstance(value, str):
        _check_callable(value, params)
        return TemplateSpec(value)
    fields = template_fields(value)
    names = {p.name for p in params if p.kind is not p.VAR_KEYWORD}
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return TemplateSpec(value, fields)  # any field may come through **kwargs
    unknown = [f for f in fields if f not in names]
    if unknown:
        raise ValueError(
            f"template {value!r} uses {', '.join(map(repr, unknown))}, which "
            f"{'is not a parameter' if len(unknown) == 1 else 'are not parameters'} of "
            f"{fn.__qualname__}({', '.join(p.name for p in params)})"
            f"{options.suggest(unknown[0], names)}"
        )
    return TemplateSpec(value, fields)


@functools.lru_cache(maxsize=1024)
def _signature(run: Callable[..., Any]) -> inspect.Signature:
    # Built once per task function instead of on every keyed publish and run.
    return inspect.signature(run)


@functools.lru_cache(maxsize=1024)
def _plain_parameters(run: Callable[..., Any]) -> tuple[tuple[str, ...], dict[str, Any]] | None:
    """The parameter names and defaults of ``run`` when every parameter is a plain one.

    Plain: positional-or-keyword, no ``*args``/``**kwargs``, positional-only or keyword-only
    ones. Such a signature binds with a dict lookup per argument, which costs a fraction of
    ``Signature.bind``; any other signature (or a call that does not fit) takes ``bind``.
    """
    params = _signature(run).parameters.values()
    if any(p.kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params):
        return None
    names = tuple(p.name for p in params)
    defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    return names, defaults


def _bind_plain(
    names: tuple[str, ...],
    defaults: Mapping[str, Any],
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
) -> dict[str, Any] | None:
    """Bind a call to plain parameters in their order; None when the call does not fit."""
    if len(args) > len(names):
        return None
    given = dict(zip(names, args, strict=False))  # fewer arguments than parameters: defaults
    for name, value in kwargs.items():
        if name in given or name not in names:
            return None  # twice, or unknown: ``Signature.bind`` words the error
        given[name] = value
    arguments: dict[str, Any] = {}
    for name in names:
        if name in given:
            arguments[name] = given[name]
        elif name in defaults:
            arguments[name] = defaults[name]
        else:
            return None  # missing: ``Signature.bind`` words the error
    return arguments


def bind_arguments(
    task: Any, args: Sequence[Any] | None, kwargs: Mapping[str, Any] | None
) -> dict[str, Any]:
    """Bind a call's arguments to the task's parameters, defaults applied.

    ``**kwargs`` parameters are flattened in, so a template can name their entries.

    Raises:
        TypeError: The arguments do not fit the task's signature.
    """
    # ``task.run`` is a bound method for ``bind=True`` tasks, so ``self`` is not a parameter.
    run = task.run
    plain = _plain_parameters(run)
    if plain is not None:
        fast = _bind_plain(plain[0], plain[1], args or (), kwargs or {})
        if fast is not None:
            return fast
    signature = _signature(run)
    bound = signature.bind(*(args or ()), **(kwargs or {}))
    bound.apply_defaults()
    arguments: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            arguments.update(value)
        else:
            arguments[name] = value
    return arguments


def render(spec: Any, arguments: Mapping[str, Any]) -> str:
    """Render a spec (template or callable) or a literal value from a call's arguments.

    Raises:
        ValueError: A template value is missing (``None``/empty) or cannot be formatted, or
            the result is empty or not a string (an int is turned into one).
    """
    if isinstance(spec, str):
        raw: Any = spec
    elif isinstance(spec, TemplateSpec) and isinstance(spec.source, str):
        missing = [f for f in spec.fields if arguments.get(f) in (None, "")]
        if missing:
            raise ValueError(
                f"template {spec.source!r} has no value for {', '.join(map(repr, missing))}"
            )
        try:
            raw = spec.source.format_map(arguments)
        except (AttributeError, IndexError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"template {spec.source!r}: {exc!r}") from None
    else:
        func: Callable[..., Any] = spec.source if isinstance(spec, TemplateSpec) else spec  # type: ignore[assignment]
        raw = func(**arguments)
    if isinstance(raw, int) and not isinstance(raw, bool):
        raw = str(raw)
    if not isinstance(raw, str):
        raise ValueError(f"must be a str, got {type(raw).__name__}")
    if not raw.strip():
        raise ValueError("is empty")
    return raw
