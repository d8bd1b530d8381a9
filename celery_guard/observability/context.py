"""Who and what the current code runs for: the HTTP request and the guarded run, if any.

Two context variables (safe across threads and asyncio tasks): the *origin* (request id and
initiator, set by ``RequestIdMiddleware`` in a web process and from the guard header in a
worker, so tasks enqueued by tasks keep the request id) and the *run* (the task being run, its
queue and attempt, and the outcome event it ended with).
"""

from __future__ import annotations

import contextlib
import contextvars
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

#: Fields of the run context that every event of a running task carries.
FIELDS = ("task_id", "task_name", "queue", "attempt", "tenant", "request_id", "initiator")

#: A request id taken from a client header: bounded and safe in logs and headers.
_VALID_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


@dataclass
class Origin:
    """Where the work comes from: the request id and who started it (a user id).

    ``initiator`` may be a callable, resolved on first use: the middleware runs before the
    view has authenticated (or touched) ``request.user``.
    """

    request_id: str
    initiator: str | Callable[[], str | None] | None = None

    def who(self) -> str | None:
        """The initiator's id, resolving it once."""
        if callable(self.initiator):
            self.initiator = self.initiator()
        return self.initiator

    def header(self) -> dict[str, Any]:
        """The guard header field ``request``: ``{"id": ..., "initiator": ...}``."""
        who = self.who()
        return {"id": self.request_id, **({"initiator": who} if who is not None else {})}


@dataclass
class Run:
    """The guarded delivery being run in this context."""

    task_id: str | None
    task_name: str
    queue: str | None
    attempt: int | None
    tenant: str | None
    origin: Origin | None
    #: The outcome event this delivery ended with, once one was emitted.
    outcome: str | None = None
    #: ``time.monotonic()`` when the delivery started.
    started: float = field(default_factory=time.monotonic)
    #: The context fields, made on the first event (see :meth:`fields`).
    _fields: dict[str, Any] | None = field(default=None, init=False, repr=False, compare=False)

    def elapsed(self) -> float:
        """Seconds since the delivery started."""
        return time.monotonic() - self.started

    def origin_fields(self) -> dict[str, Any]:
        """The request id and initiator (what work enqueued by this run inherits)."""
        origin = self.origin
        return {
            "request_id": origin.request_id if origin else None,
            "initiator": origin.who() if origin else None,
        }

    def fields(self) -> dict[str, Any]:
        """The context fields of its events (a new dict each call)."""
        return dict(self.shared_fields())

    def shared_fields(self) -> dict[str, Any]:
        """The context fields of its events, made once per run: never change the dict.

        Every event of a run (at least ``started`` and its outcome) carries them; they do
        not change while it runs.
        """
        found = self._fields
        if found is None:
            found = self._fields = {
                "task_id": self.task_id,
                "task_name": self.task_name,
                "queue": self.queue,
                "attempt": self.attempt,
                "tenant": self.tenant,
                **self.origin_fields(),
            }
        return found


_origin: contextvars.ContextVar[Origin | None] = contextvars.ContextVar(
    "celery_guard_origin", default=None
)
_run: contextvars.ContextVar[Run | None] = contextvars.ContextVar("celery_guard_run", default=None)


def new_request_id() -> str:
    """A fresh request id (32 hex characters)."""
    return uuid.uuid4().hex


def clean_request_id(value: str | None) -> str | None:
    """``value`` if it is a usable request id from a client, else ``None``."""
    if value and _VALID_ID.match(value):
        return value
    return None


def origin() -> Origin | None:
    """The origin of the current code, if any."""
    return _origin.get()


def current() -> Run | None:
    """The guarded run of the current code, if any."""
    return _run.get()


@contextlib.contextmanager
def bind_origin(value: Origin | None) -> Iterator[Origin | None]:
    """Make ``value`` the origin inside the block."""
    token = _origin.set(value)
    try:
        yield value
    finally:
        _origin.reset(token)


class _BoundRun:
    """What :func:`bind_run` returns: a plain class, cheaper per delivery than a generator."""

    __slots__ = ("_run", "_tokens")

    def __init__(self, run: Run) -> None:
        self._run = run

    def __enter__(self) -> Run:
        run = self._run
        self._tokens = (_run.set(run), _origin.set(run.origin))
        return run

    def __exit__(self, *exc_info: object) -> None:
        run_token, origin_token = self._tokens
        _origin.reset(origin_token)
        _run.reset(run_token)


def bind_run(run: Run) -> contextlib.AbstractContextManager[Run]:
    """Make ``run`` (and its origin) the current run inside the block."""
    return _BoundRun(run)


def origin_from_header(value: Any) -> Origin | None:
    """The origin a guard header's ``request`` field carries, if well formed."""
    if not isinstance(value, dict):
        return None
    request_id = value.get("id")
    if not isinstance(request_id, str) or not request_id:
        return None
    who = value.get("initiator")
    return Origin(request_id[:128], str(who) if who is not None else None)
