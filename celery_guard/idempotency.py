"""Idempotency keys: options, key derivation, enqueue-time dedup and the worker-side guard.

The decisions are taken by a :class:`~celery_guard.ledger.Ledger`; this module derives keys
and fingerprints from a call's arguments and applies the outcomes: publish or not, run the
body or not. See ``docs/idempotency.md`` for the semantics, numbered like the issue.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import os
import re
import socket
import string
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from celery.exceptions import Retry
from django.db import transaction

from celery_guard import headers, ledger, options
from celery_guard.conf import guard_settings
from celery_guard.exceptions import IdempotencyConflict, IdempotencyKeyError, LeaseLost

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
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise TypeError(f"expected a timedelta or seconds (int/float), got {type(value).__name__}")
    if seconds <= 0:
        raise ValueError(f"must be positive, got {value!r}")
    return seconds


def _validate_conflict(value: Any) -> str:
    if value not in ("raise", "ignore"):
        raise ValueError(f"expected 'raise' or 'ignore', got {value!r}")
    return str(value)


IDEMPOTENCY_KEY = options.register(
    options.GuardOption(
        name="idempotency_key",
        validate=_validate_key,
        for_function=_key_for_function,
    )
)
DEDUP_WINDOW = options.register(
    options.GuardOption(name="dedup_window", validate=_validate_window, setting="DEDUP_WINDOW")
)
IDEMPOTENCY_CONFLICT = options.register(
    options.GuardOption(name="idempotency_conflict", validate=_validate_conflict, default="raise")
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
        """Return the header entry (``celery_guard.idempotency``)."""
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
    spec = options.resolve("idempotency_key", per_call, task.guard_options)
    if spec is None:
        return None
    arguments = bind_arguments(task, args, kwargs)
    window = options.resolve("dedup_window", per_call, task.guard_options)
    return Identity(
        key=derive(task.name, spec, arguments),
        fingerprint=fingerprint(arguments),
        window=_validate_window(window),
        on_conflict=options.resolve("idempotency_conflict", per_call, task.guard_options),
    )


@dataclass
class RunContext:
    """What a running task knows about its idempotency key: ``self.guard`` in the body.

    Attributes:
        key: The key of this run, or ``None`` when the task has none.
        fencing_token: Incremented by every start or takeover of the key; pass it to
            downstream writes so they can reject a stale attempt (a lower token).
        owner: Identifies this attempt in the ledger.
    """

    key: str | None = None
    fencing_token: int | None = None
    owner: str | None = None
    task_id: str | None = None
    store: ledger.Ledger | None = field(default=None, repr=False)
    completed: bool = False

    def renew(self, lease: float | None = None) -> None:
        """Extend this run's lease, for a body that may outlive it (call it periodically).

        Args:
            lease: Seconds from now; defaults to ``CELERY_GUARD_IDEMPOTENCY_LEASE``.

        Raises:
            LeaseLost: The lease already expired or the key was taken over: stop working.
        """
        if self.key is None or self.owner is None or self.store is None:
            return
        assert self.fencing_token is not None
        seconds = guard_settings.idempotency_lease if lease is None else lease
        if not self.store.renew(
            self.key, owner=self.owner, token=self.fencing_token, lease=seconds
        ):
            logger.warning(
                "celery_guard: %s cannot renew key %r (token %s): lease lost",
                self.task_id,
                self.key,
                self.fencing_token,
            )
            raise LeaseLost(f"idempotency key {self.key!r}: the lease was lost")

    @contextlib.contextmanager
    def atomic(self, using: str | None = None) -> Iterator[None]:
        """A ``transaction.atomic()`` block that also marks the key succeeded in it.

        The effect written inside the block and the ledger's ``succeeded`` commit together
        or roll back together: the one exactly-once path for the effect. Without a key this
        is a plain ``transaction.atomic()``.

        Raises:
            LeaseLost: Another attempt took the key over; the block is rolled back.
            TypeError: The ledger is not the database ledger.
        """
        if self.key is None or self.owner is None or self.store is None:
            with transaction.atomic(using=using):
                yield
            return
        if not isinstance(self.store, ledger.DatabaseLedger):
            raise TypeError(
                "self.guard.atomic() needs CELERY_GUARD_IDEMPOTENCY_BACKEND = 'database': "
                "the effect and the ledger must share one database transaction"
            )
        alias = using or self.store.using()
        if alias != self.store.using():
            raise TypeError(f"the ledger is in database {self.store.using()!r}, not {alias!r}")
        assert self.fencing_token is not None
        with transaction.atomic(using=alias):
            yield
            done = self.store.finish(
                self.key, owner=self.owner, token=self.fencing_token, state=ledger.SUCCEEDED
            )
            if not done:
                logger.warning(
                    "celery_guard: %s lost key %r (token %s) before completing; rolling back",
                    self.task_id,
                    self.key,
                    self.fencing_token,
                )
                raise LeaseLost(f"idempotency key {self.key!r} was taken over; rolled back")
        self.completed = True
        logger.info(
            "celery_guard: %s completed key %r in its transaction (token %s)",
            self.task_id,
            self.key,
            self.fencing_token,
        )


_CONTEXT_ATTR = "celery_guard_run"


def context(request: Any) -> RunContext:
    """Return the run context of a task request (an empty one outside a guarded run)."""
    ctx = getattr(request, _CONTEXT_ATTR, None)
    return ctx if isinstance(ctx, RunContext) else RunContext()


def publish_once(
    task: Any, identity: Identity | None, task_id: str, publish: Callable[[], Any]
) -> Any:
    """Publish a call unless its key is already held inside its window.

    The key is claimed before the publish and released if the publish raises, so a failed
    publish leaves no claim behind. The claim is provisional until the publish is confirmed
    after it returns: a producer that dies in between leaves a claim that the next enqueue
    takes over once ``CELERY_GUARD_IDEMPOTENCY_PUBLISH_GRACE`` has passed, so the job is not
    lost. A republish of the running task itself (a Celery retry) gives its lease back
    instead, so the next attempt can run.

    Returns:
        The ``AsyncResult`` of the publish, or of the first task when this is a duplicate.

    Raises:
        IdempotencyConflict: The key is held by a call with other arguments.
    """
    if identity is None:
        return publish()
    store = ledger.get_ledger()
    ctx = context(task.request)
    if task_id == task.request.id and ctx.key == identity.key:
        if ctx.owner is not None and ctx.fencing_token is not None:
            store.yield_lease(identity.key, owner=ctx.owner, token=ctx.fencing_token)
            logger.info("celery_guard: %s gives key %r back for its retry", task_id, ctx.key)
        return publish()
    claim = store.claim(
        identity.key,
        task_name=task.name,
        task_id=task_id,
        fingerprint=identity.fingerprint,
        window=identity.window,
    )
    if claim.outcome == "conflict" and identity.on_conflict == "raise":
        logger.warning(
            "celery_guard: refused %s: key %r is held by %s with other arguments",
            task.name,
            identity.key,
            claim.task_id,
        )
        raise IdempotencyConflict(
            f"{task.name}: idempotency key {identity.key!r} is already used by task "
            f"{claim.task_id} with other arguments (inside its dedup window)",
            key=identity.key,
            task_id=claim.task_id,
        )
    if claim.outcome != "claimed":
        logger.info(
            "celery_guard: %s not published: key %r is held by %s (%s)",
            task.name,
            identity.key,
            claim.task_id,
            claim.outcome,
        )
        return task.AsyncResult(claim.task_id)
    if claim.abandoned:
        logger.warning(
            "celery_guard: %s[%s] took key %r over from %s, whose publish was never "
            "confirmed (its producer died between the claim and the publish, or the publish "
            "outlasted CELERY_GUARD_IDEMPOTENCY_PUBLISH_GRACE)",
            task.name,
            task_id,
            identity.key,
            claim.abandoned,
        )
    else:
        logger.info("celery_guard: %s[%s] claimed key %r", task.name, task_id, identity.key)
    try:
        result = publish()
    except BaseException:
        store.unclaim(identity.key, task_id)
        logger.warning(
            "celery_guard: publish of %s[%s] failed; key %r released",
            task.name,
            task_id,
            identity.key,
        )
        raise
    _confirm(store, task, identity.key, task_id)
    return result


def _confirm(store: ledger.Ledger, task: Any, key: str, task_id: str) -> None:
    """Confirm a published claim; never raises, since the message is out already.

    An unconfirmed claim only means that, after the grace, another enqueue may publish the
    key again: a duplicate message that the worker-side guard runs at most once.
    """
    try:
        confirmed = store.confirm(key, task_id)
    except Exception:
        logger.warning(
            "celery_guard: %s[%s] published but its claim of key %r could not be confirmed; "
            "after the publish grace another enqueue may publish the key again",
            task.name,
            task_id,
            key,
            exc_info=True,
        )
        return
    if not confirmed:
        # Not an error when a worker already started the task (state running or later);
        # the record tells whether the key was taken over instead.
        logger.info(
            "celery_guard: %s[%s] published; key %r was no longer an unconfirmed claim of it "
            "(started already, or taken over)",
            task.name,
            task_id,
            key,
        )


def _owner(request: Any) -> str:
    host = getattr(request, "hostname", None) or socket.gethostname()
    return f"{host}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def run_guarded(
    task: Any, args: tuple[Any, ...], kwargs: dict[str, Any], call: Callable[..., Any]
) -> Any:
    """Run a task body under its key's lease (worker side); see ``docs/idempotency.md``.

    A key that already succeeded is not run again; a key whose lease is held by a live
    owner is retried after the lease; otherwise this attempt takes the lease (a takeover
    when the previous owner's lease expired), runs the body and marks the key succeeded, or
    failed if the body raises (a Celery retry gives the lease back instead).
    """
    request = task.request
    if request.called_directly:
        return call(*args, **kwargs)
    identity = Identity.from_header(headers.read(getattr(request, "headers", None)))
    if identity is None:
        identity = identify(task, args, kwargs, {})
    if identity is None:
        return call(*args, **kwargs)
    store = ledger.get_ledger()
    owner = _owner(request)
    lease = max(guard_settings.idempotency_lease, float(task.time_limit or 0))
    start = store.start(
        identity.key,
        task_name=task.name,
        task_id=request.id,
        fingerprint=identity.fingerprint,
        window=identity.window,
        owner=owner,
        lease=lease,
    )
    ctx = RunContext(key=identity.key, task_id=request.id, store=store)
    setattr(request, _CONTEXT_ATTR, ctx)
    if start.outcome == "skip":
        logger.info(
            "celery_guard: %s[%s] skipped: key %r already succeeded (task %s)",
            task.name,
            request.id,
            identity.key,
            start.task_id,
        )
        return None
    if start.outcome == "busy":
        logger.info(
            "celery_guard: %s[%s]: key %r is running in %s; retrying in %.1fs",
            task.name,
            request.id,
            identity.key,
            start.task_id,
            start.retry_in,
        )
        # Republished as it is (not counted as a retry: the body did not run), once the
        # holder's lease has ended; the holder's outcome decides what happens then.
        wait = max(start.retry_in, 0.1)
        reason = f"key {identity.key!r} is running elsewhere"
        if request.is_eager:  # task.apply(): nothing to republish, the caller sees RETRY
            raise Retry(reason, when=wait)
        again = task.signature_from_request(request, countdown=wait, retries=request.retries)
        again.apply_async()
        raise Retry(reason, when=wait, sig=again)
    ctx.owner, ctx.fencing_token = owner, start.fencing_token
    logger.info(
        "celery_guard: %s[%s] runs key %r with fencing token %s",
        task.name,
        request.id,
        identity.key,
        start.fencing_token,
    )
    try:
        result = call(*args, **kwargs)
    except Retry:
        raise
    except BaseException:
        if not ctx.completed:
            store.finish(identity.key, owner=owner, token=start.fencing_token, state=ledger.FAILED)
            logger.info("celery_guard: %s[%s] key %r failed", task.name, request.id, identity.key)
        raise
    if not ctx.completed:
        if store.finish(
            identity.key, owner=owner, token=start.fencing_token, state=ledger.SUCCEEDED
        ):
            logger.info(
                "celery_guard: %s[%s] key %r succeeded", task.name, request.id, identity.key
            )
        else:
            logger.warning(
                "celery_guard: %s[%s] finished but key %r was taken over meanwhile "
                "(token %s is stale); the effect may have happened twice",
                task.name,
                request.id,
                identity.key,
                start.fencing_token,
            )
    return result


def release(key: str, task_id: str | None = None) -> bool:
    """Free ``key`` so a new call can run (only while ``task_id`` holds it, when given)."""
    released = ledger.get_ledger().release(key, task_id)
    logger.info("celery_guard: key %r %s", key, "released" if released else "not held")
    return released


def purge() -> int:
    """Delete ledger records past their window and the retention; return how many."""
    deleted = ledger.get_ledger().purge(guard_settings.idempotency_retention)
    logger.info("celery_guard: purged %d expired idempotency records", deleted)
    return deleted
