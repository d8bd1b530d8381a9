"""The guard option model: each pipeline step declares the options it owns.

An option is declared with a validator and, optionally, the setting that supplies the
project-wide default. The decorator validates options at decoration time, ``apply_async``
validates per-call overrides at enqueue time, and :meth:`GuardOption.resolve` applies the
precedence *per call > decorator > settings > built-in default*.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from celery_guard import conf

Validator = Callable[[Any], Any]


@dataclass(frozen=True)
class GuardOption:
    """One guard option.

    Attributes:
        name: Keyword used in ``@guarded_task(...)`` and in ``apply_async(guard={...})``.
        validate: Returns the normalized value, or raises ``TypeError``/``ValueError`` with a
            message that does not repeat the option name (it is prefixed for the user).
        setting: Suffix of the ``CELERY_GUARD_*`` setting that supplies the project default.
        default: Built-in default used when neither the task nor the setting gives a value.
        per_call: Whether ``apply_async(guard={...})`` may override it.
        for_function: Called at decoration time with the validated decorator value, the task
            function and whether the task is bound (``bind=True``); returns the value to keep.
            For options that must agree with the task's signature. Raises like ``validate``.
    """

    name: str
    validate: Validator
    setting: str | None = None
    default: Any = None
    per_call: bool = True
    for_function: Callable[[Any, Callable[..., Any], bool], Any] | None = None

    def resolve(self, per_call: Mapping[str, Any], task_options: Mapping[str, Any]) -> Any:
        """The effective value: per call > decorator > setting > built-in default."""
        if self.name in per_call:
            return per_call[self.name]
        if self.name in task_options:
            return task_options[self.name]
        if self.setting is None:
            return self.default
        if self.setting in conf.DURATIONS:
            # Validated here too: a process that skipped ``manage.py check`` must not carry a
            # NaN or infinite window into the ledger (ImproperlyConfigured names the setting).
            return conf.duration(self.setting)
        return conf.raw(self.setting)


def suggest(name: str, candidates: Iterable[str]) -> str:
    """Return a ``" (did you mean 'x'?)"`` hint for a misspelt name, or an empty string."""
    close = difflib.get_close_matches(name, list(candidates), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def validate_value(option: GuardOption, value: Any, *, where: str) -> Any:
    """Validate one value, re-raising its error with the option named."""
    try:
        return option.validate(value)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{where} option {option.name!r}: {exc}") from None


class OptionSet:
    """The guard options of a pipeline, by name: what ``@guarded_task`` and ``guard=`` accept."""

    def __init__(self, options: Iterable[GuardOption]) -> None:
        self._options: dict[str, GuardOption] = {}
        for option in options:
            if option.name in self._options:
                raise RuntimeError(f"guard option {option.name!r} is declared twice")
            self._options[option.name] = option

    def __contains__(self, name: object) -> bool:
        return name in self._options

    def names(self) -> frozenset[str]:
        """Every option name."""
        return frozenset(self._options)

    def clean(
        self, options: Mapping[str, Any], *, where: str, per_call: bool = False
    ) -> dict[str, Any]:
        """Validate guard options, returning their normalized values.

        Args:
            options: Option name -> value, guard options only.
            where: Names the entry point in error messages (``"@guarded_task"``...).
            per_call: Only accept options that may be overridden per call.

        Raises:
            TypeError: An option is unknown, not overridable per call, or has the wrong type.
            ValueError: An option has a value out of its range.
        """
        if not isinstance(options, Mapping):
            # apply_async(guard="high") instead of guard={"priority": "high"}.
            raise TypeError(
                f"{where}: guard options must be a dict of option name -> value, got "
                f"{type(options).__name__} {options!r}"
            )
        cleaned: dict[str, Any] = {}
        for name, value in options.items():
            option = self._options.get(name)
            if option is None:
                allowed = [n for n, o in self._options.items() if o.per_call or not per_call]
                raise TypeError(f"{where}: unknown guard option {name!r}{suggest(name, allowed)}")
            if per_call and not option.per_call:
                raise TypeError(f"{where}: guard option {name!r} cannot be overridden per call")
            cleaned[name] = validate_value(option, value, where=where)
        return cleaned

    def bind_to_function(
        self, cleaned: Mapping[str, Any], fn: Callable[..., Any], *, bind: bool, where: str
    ) -> dict[str, Any]:
        """Let options that depend on the task function check it and normalize their value.

        Raises:
            TypeError, ValueError: An option does not fit the function (the option is named).
        """
        bound = dict(cleaned)
        for name, value in cleaned.items():
            hook = self._options[name].for_function
            if hook is None:
                continue
            try:
                bound[name] = hook(value, fn, bind)
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"{where} option {name!r}: {exc}") from None
        return bound
