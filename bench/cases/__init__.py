"""Case registry: the task variants the runner compares, one module per feature.

A module in this package builds Celery tasks from the bodies in :mod:`bench.benchapp.bodies`
and calls :func:`register` at import time. The runner measures every registered variant the
same way and reports each guarded one against the baseline (plain Celery), so a feature adds
its cases by adding a module here, without touching the runner::

    # bench/cases/idempotency_redis.py
    TASKS = {kind: guarded_task(name=f"bench.idem_redis.{kind}", priority="default",
                                idempotency_key="bench:{ident}")(body)
             for kind, body in bodies.KINDS.items()}
    register(Variant(name="guarded-idem-redis", title="routing + idempotency (Redis)",
                     tasks=TASKS, queue=guard_settings.priority_queues["default"],
                     reset=clear_the_ledger, targets=ISSUE_TARGETS))

Every body takes ``ident`` as its last argument, a number unique within the run, so keys
derived from it never repeat across repetitions. Modules are imported by
:mod:`bench.benchapp.tasks`, so the runner and the worker it starts register the same
variants.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

#: The task kinds every variant provides (see ``bench.benchapp.bodies``).
KINDS = ("noop", "sleep", "stamp")

#: Targets of issue 7 for a guarded variant, as minimum ratios guarded/plain (``*_rate``)
#: or as maximum extra broker commands per task (``extra_commands_*``). Reported, never asserted.
ISSUE_TARGETS: Mapping[str, float] = {
    "enqueue_rate": 0.75,
    "drain_noop_rate": 0.85,
    "drain_sleep_rate": 0.97,
    "extra_commands_enqueue": 2,
    "extra_commands_execute": 2,
}

Sender = Callable[[Any, tuple[Any, ...], int], Any]


def default_send(task: Any, args: tuple[Any, ...], ident: int) -> Any:
    """Publish one call the way application code does: ``task.apply_async(args)``."""
    return task.apply_async(args)


@dataclass(frozen=True)
class Variant:
    """One side of the comparison: a set of tasks published and run the same way.

    Attributes:
        name: Stable id, the key in the results JSON.
        title: Label in the Markdown table.
        tasks: Task kind (``noop``, ``sleep``, ``stamp``) -> Celery task.
        queue: The queue the tasks are routed to (the runner drains it).
        baseline: The plain-Celery side every other variant is compared with (exactly one).
        send: Publishes one call: ``send(task, args, ident)``, ``ident`` being the last of
            ``args`` (per-call guard options go here).
        reset: Called before every measured run (e.g. to clear a ledger).
        needs_database: The runner migrates the bench database first.
        targets: Issue targets shown next to the ratios (see :data:`ISSUE_TARGETS`).
        description: One sentence for the docs and the JSON.
        order: Position in the run and the report among the guarded variants (lower first;
            equal ones in registration order).
        reference: Another guarded variant: "the same task without" this variant's feature
            (e.g. routing only for the limits), shown as a ratio next to the one to plain.
        reference_targets: Targets of the ratios to ``reference`` (minimum ratios, keyed by
            metric like :data:`ISSUE_TARGETS`).
    """

    name: str
    title: str
    tasks: Mapping[str, Any]
    queue: str
    baseline: bool = False
    send: Sender = default_send
    reset: Callable[[], None] | None = None
    needs_database: bool = False
    targets: Mapping[str, float] = field(default_factory=dict)
    description: str = ""
    order: int = 100
    reference: str | None = None
    reference_targets: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        missing = [kind for kind in KINDS if kind not in self.tasks]
        if missing:
            raise ValueError(f"bench variant {self.name!r} lacks task kinds {missing}")


_registry: dict[str, Variant] = {}


def register(variant: Variant) -> Variant:
    """Add ``variant`` to the registry (re-registering the same name replaces it)."""
    if variant.baseline and any(v.baseline and v.name != variant.name for v in _registry.values()):
        raise ValueError(f"bench variant {variant.name!r}: there is already a baseline")
    _registry[variant.name] = variant
    return variant


def load_all() -> None:
    """Import every module of this package, so each registers its variants."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


def variants(selected: list[str] | None = None) -> list[Variant]:
    """Return the registered variants, baseline first, optionally only those ``selected``.

    Raises:
        LookupError: No baseline is registered, or a selected name is unknown.
    """
    baseline = [v for v in _registry.values() if v.baseline]
    if not baseline:
        raise LookupError("no baseline bench variant is registered")
    unknown = sorted(set(selected or ()) - set(_registry))
    if unknown:
        raise LookupError(f"unknown bench variants {unknown}; known: {sorted(_registry)}")
    others = sorted((v for v in _registry.values() if not v.baseline), key=lambda v: v.order)
    if selected:
        others = [v for v in others if v.name in selected]
    return [*baseline, *others]
