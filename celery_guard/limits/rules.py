"""Limit options and rules: rate strings, the guard options, named limits, a run's rules.

A *rule* is one scope the admission checks: a task type's own limit (``task:<name>``), a
named limit shared by several task types (``limit:<name>``, from ``CELERY_GUARD_LIMITS``),
or one tenant's limit of a task type (``tenant:<task>:<tenant>``). Each carries an optional
concurrency and an optional rate.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from django.core.exceptions import ImproperlyConfigured

from celery_guard import conf
from celery_guard.core import options, templates

#: Seconds in each period a rate string may name.
PERIODS: Mapping[str, float] = {"s": 1.0, "m": 60.0, "h": 3600.0}
_RATE = re.compile(r"\s*(\d+)\s*/\s*([smh])\s*")
#: Keys an entry of ``CELERY_GUARD_LIMITS`` may have.
ENTRY_KEYS = ("rate", "concurrency")
#: The guard header field of the tenant a job runs for.
TENANT_FIELD = "tenant"
#: Longest tenant value kept verbatim in the header (longer ones are hashed).
MAX_TENANT = 100


@dataclass(frozen=True)
class Rate:
    """At most ``count`` starts in any sliding window of ``period`` seconds."""

    count: int
    period: float

    def __str__(self) -> str:
        unit = {v: k for k, v in PERIODS.items()}.get(self.period)
        return f"{self.count}/{unit}" if unit else f"{self.count}/{self.period:g}s"


def parse_rate(value: Any) -> Rate:
    """Parse ``"N/s"``, ``"N/m"`` or ``"N/h"`` (N >= 1); a :class:`Rate` passes through.

    Raises:
        TypeError: The value is not a string.
        ValueError: The string is not ``N/s|m|h`` with a positive N.
    """
    if isinstance(value, Rate):
        return value
    if not isinstance(value, str):
        raise TypeError(f"expected a rate string like '50/s', got {type(value).__name__}")
    match = _RATE.fullmatch(value)
    if match is None or int(match.group(1)) < 1:
        raise ValueError(
            f"{value!r} is not a rate: write 'N/s', 'N/m' or 'N/h' with N >= 1, e.g. '50/s'"
        )
    return Rate(int(match.group(1)), PERIODS[match.group(2)])


def parse_concurrency(value: Any) -> int:
    """A concurrency: an int >= 1.

    Raises:
        TypeError: Not an int.
        ValueError: Below 1.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an int >= 1, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"must be at least 1, got {value}")
    return value


@dataclass(frozen=True)
class NamedLimit:
    """One entry of ``CELERY_GUARD_LIMITS``."""

    concurrency: int | None = None
    rate: Rate | None = None


def entry_errors(name: Any, entry: Any) -> tuple[list[str], list[str]]:
    """What is wrong with one ``CELERY_GUARD_LIMITS`` entry: (shape errors, value errors)."""
    where = f"CELERY_GUARD_LIMITS[{name!r}]"
    if not isinstance(name, str) or not name.strip():
        return [f"CELERY_GUARD_LIMITS: limit names must be non-empty strings, got {name!r}"], []
    if not isinstance(entry, Mapping):
        return [f"{where} must be a dict with 'rate' and/or 'concurrency'"], []
    unknown = [k for k in entry if k not in ENTRY_KEYS]
    if unknown:
        hint = options.suggest(str(unknown[0]), ENTRY_KEYS)
        return [f"{where} has unknown key {unknown[0]!r}{hint}"], []
    if not entry:
        return [f"{where} names neither 'rate' nor 'concurrency'"], []
    values = []
    if "rate" in entry:
        try:
            parse_rate(entry["rate"])
        except (TypeError, ValueError) as exc:
            values.append(f"{where}['rate']: {exc}")
    if "concurrency" in entry:
        try:
            parse_concurrency(entry["concurrency"])
        except (TypeError, ValueError) as exc:
            values.append(f"{where}['concurrency']: {exc}")
    return [], values


def setting_errors() -> tuple[list[str], list[str]]:
    """What is wrong with ``CELERY_GUARD_LIMITS``: (shape errors, value errors)."""
    value = conf.raw("LIMITS")
    if not isinstance(value, Mapping):
        return [f"CELERY_GUARD_LIMITS must be a dict of name -> limit, got {value!r}"], []
    shape: list[str] = []
    values: list[str] = []
    for name, entry in value.items():
        s, v = entry_errors(name, entry)
        shape += s
        values += v
    return shape, values


def named_limits() -> dict[str, NamedLimit]:
    """``CELERY_GUARD_LIMITS`` parsed.

    Raises:
        ImproperlyConfigured: The setting is invalid (what E008/E009 report).
    """
    shape, values = setting_errors()
    if shape or values:
        raise ImproperlyConfigured((shape + values)[0])
    found = {}
    for name, entry in conf.raw("LIMITS").items():
        rate = entry.get("rate")
        concurrency = entry.get("concurrency")
        found[name] = NamedLimit(
            concurrency=None if concurrency is None else parse_concurrency(concurrency),
            rate=None if rate is None else parse_rate(rate),
        )
    return found


def _validate_limits(value: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise TypeError(
            f"expected a list of names from CELERY_GUARD_LIMITS, got {type(value).__name__}"
        )
    names = []
    for name in value:
        if not isinstance(name, str) or not name.strip():
            raise TypeError(f"limit names must be non-empty strings, got {name!r}")
        names.append(name)
    if conf.configured():
        shape, values = setting_errors()
        if not shape and not values:  # an invalid setting is E008/E009's to report
            known = list(conf.raw("LIMITS"))
            for name in names:
                if name not in known:
                    raise ValueError(
                        f"unknown limit {name!r}{options.suggest(name, known)}; "
                        f"CELERY_GUARD_LIMITS defines {sorted(known)!r}"
                    )
    return tuple(dict.fromkeys(names))


def _validate_tenant(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # a literal tenant per call
    return templates.validate(value)


LIMITS = options.GuardOption("limits", _validate_limits, default=(), per_call=False)
CONCURRENCY = options.GuardOption("concurrency", parse_concurrency, per_call=False)
RATE = options.GuardOption("rate", parse_rate, per_call=False)
TENANT = options.GuardOption("tenant", _validate_tenant, for_function=templates.for_function)
TENANT_CONCURRENCY = options.GuardOption("tenant_concurrency", parse_concurrency, per_call=False)
TENANT_RATE = options.GuardOption("tenant_rate", parse_rate, per_call=False)
OPTIONS = (LIMITS, CONCURRENCY, RATE, TENANT, TENANT_CONCURRENCY, TENANT_RATE)


def check_together(task_options: Mapping[str, Any], where: str) -> None:
    """Options that need each other: a per-tenant limit needs a ``tenant`` template.

    Raises:
        ValueError: ``tenant_concurrency`` or ``tenant_rate`` without ``tenant``.
    """
    if task_options.get(TENANT.name) is not None:
        return
    for option in (TENANT_CONCURRENCY, TENANT_RATE):
        if task_options.get(option.name) is not None:
            raise ValueError(
                f"{where} option {option.name!r}: needs a 'tenant' template naming whose "
                "limit it is, e.g. tenant='{department_id}'"
            )


def tenant_of(
    task: Any,
    args: Sequence[Any] | None,
    kwargs: Mapping[str, Any] | None,
    per_call: Mapping[str, Any],
) -> str | None:
    """The tenant of a call, rendered from its ``tenant`` template (``None`` without one).

    Raises:
        ValueError: The template cannot be rendered from the call's arguments.
    """
    spec = TENANT.resolve(per_call, task.guard_options)
    if spec is None:
        return None
    try:
        arguments = templates.bind_arguments(task, args, kwargs)
        value = templates.render(spec, arguments)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{task.name}: cannot derive the tenant: {exc}") from None
    if len(value) > MAX_TENANT:
        value = "#" + hashlib.sha256(value.encode()).hexdigest()
    return value


@dataclass(frozen=True)
class Rule:
    """One scope the admission checks, with its limits (see the module docstring)."""

    scope: str
    concurrency: int | None = None
    rate: Rate | None = None


def rules_for(
    task: Any,
    tenant: str | None,
    *,
    concurrency: int | None = None,
    rate: Rate | None = None,
) -> list[Rule]:
    """The rules a run of ``task`` is admitted under (empty: it has no limit).

    Args:
        task: The guarded task.
        tenant: The tenant its header carries, if any.
        concurrency: A run-time override of the task's own concurrency (a task policy).
        rate: A run-time override of the task's own rate (a task policy).

    Raises:
        ImproperlyConfigured: ``CELERY_GUARD_LIMITS`` is invalid, or no longer defines a
            limit the task names.
    """
    opts = task.guard_options
    found = []
    own_concurrency = concurrency if concurrency is not None else opts.get(CONCURRENCY.name)
    own_rate = rate if rate is not None else opts.get(RATE.name)
    if own_concurrency is not None or own_rate is not None:
        found.append(Rule(f"task:{task.name}", own_concurrency, own_rate))
    names = opts.get(LIMITS.name) or ()
    if names:
        named = named_limits()
        for name in names:
            if name not in named:
                raise ImproperlyConfigured(
                    f"{task.name} names limit {name!r}, which CELERY_GUARD_LIMITS does not "
                    "define (celery_guard.W012)"
                )
            found.append(Rule(f"limit:{name}", named[name].concurrency, named[name].rate))
    t_concurrency, t_rate = opts.get(TENANT_CONCURRENCY.name), opts.get(TENANT_RATE.name)
    if tenant is not None and (t_concurrency is not None or t_rate is not None):
        found.append(Rule(f"tenant:{task.name}:{tenant}", t_concurrency, t_rate))
    return found
