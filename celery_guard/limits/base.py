"""What every limits store shares: the admission's answer, the outage error, the interface."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Protocol

from celery_guard.limits.rules import Rule


class Unavailable(Exception):
    """The limits store cannot be reached (or has no Redis configured)."""


@dataclass(frozen=True)
class Admission:
    """The store's answer: admitted, or which rule refused and for how long.

    ``reserved`` says the refused run now holds a reservation of ``rule``: a start (or a
    concurrency slot) kept for it ``wait`` seconds from now, ahead of the runs that come
    later (only from a store with ``reserves = True``, when asked to reserve).
    """

    admitted: bool
    holder: str
    rule: Rule | None = None
    kind: str = ""
    wait: float = 0.0
    reserved: bool = False


class LimitsStore(Protocol):
    """What the limits step needs of a store: both backends implement it alike."""

    #: Whether a refused run can reserve a future start (``admit(..., reserve=True)``).
    reserves: bool

    def admit(
        self,
        rules: Sequence[Rule],
        lease: float,
        holder: str | None = None,
        *,
        reserve: bool = False,
        held: Collection[str] = (),
    ) -> Admission:
        """Admit one run under ``rules`` (all or nothing) or say which rule refused and why.

        A store without reservations (``reserves`` false) ignores ``reserve`` and ``held``.
        """
        ...

    def release(self, rules: Sequence[Rule], holder: str) -> None:
        """Give back the concurrency slots ``holder`` took."""
        ...

    def renew(self, rules: Sequence[Rule], holder: str, lease: float) -> None:
        """Extend ``holder``'s live concurrency leases by ``lease`` seconds from now."""
        ...

    def back_off(self, rules: Sequence[Rule], seconds: float) -> None:
        """Admit no run under ``rules`` for ``seconds``."""
        ...

    def holders(self, rule: Rule) -> int:
        """How many live holders a rule's concurrency has now."""
        ...

    def ping(self) -> None:
        """One round trip to the store (``doctor``).

        Raises:
            Exception: Whatever the backend's client raises when it cannot be reached.
        """
        ...
