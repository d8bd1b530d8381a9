"""Replaying dead letters: validate, claim once, re-arm the key, publish afresh, record it.

Shared by the admin (action, detail button, edit-and-replay) and ``celery_guard replay``.
"""

from __future__ import annotations

import inspect
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from django.db import transaction
from django.db.models import Case, Value, When

from celery_guard import headers, idempotency, redaction
from celery_guard.models import DeadLetter, DeadLetterReplay

logger = logging.getLogger(__name__)

REPLAYED = "replayed"
SKIPPED = "skipped"
UNROUTABLE = "unroutable"

#: Statuses a dead letter can be replayed from: ``unroutable`` rows are validated again, so
#: replaying them works once the code that binds their arguments is deployed.
REPLAYABLE = ("dead", "unroutable")
#: Dead letters loaded and claimed per transaction in a bulk replay. A process that dies
#: mid-batch leaves the claimed rows of that batch not yet published marked ``replayed``.
BATCH = 100


@dataclass
class Summary:
    """Counts of a replay run, and what happened to each dead letter."""

    replayed: int = 0
    skipped: int = 0
    unroutable: int = 0
    #: Dead letter id -> task id of its replay.
    task_ids: dict[int, str] = field(default_factory=dict)
    #: Dead letter id -> why it cannot be replayed.
    reasons: dict[int, str] = field(default_factory=dict)

    @property
    def total(self) -> int:
        """Dead letters looked at."""
        return self.replayed + self.skipped + self.unroutable

    def add(self, outcome: str) -> None:
        """Count one dead letter's outcome."""
        setattr(self, outcome, getattr(self, outcome) + 1)

    def __str__(self) -> str:
        return (
            f"{self.replayed} replayed, {self.skipped} skipped (not dead any more), "
            f"{self.unroutable} unroutable"
        )


def signature_error(task: Any, args: Sequence[Any], kwargs: Mapping[str, Any]) -> str | None:
    """Why ``args``/``kwargs`` do not bind to ``task``'s current signature, or None.

    ``task.run`` is the function for plain tasks and a method bound to the task for
    ``bind=True`` tasks, so ``self`` is never part of the signature checked.
    """
    if not isinstance(args, (list, tuple)) or not isinstance(kwargs, Mapping):
        return "stored arguments are not a JSON list and object"
    try:
        signature = inspect.signature(task.run)
    except (TypeError, ValueError):
        return None  # a C callable or the like: nothing to check against
    try:
        signature.bind(*args, **kwargs)
    except TypeError as exc:
        return f"arguments do not bind to {task.name}{signature}: {exc}"
    return None


_loaded: set[int] = set()


def registered_tasks(app: Any) -> Mapping[str, Any]:
    """The task registry of ``app`` with every task module imported.

    A worker imports the task modules (``autodiscover_tasks``, ``imports``) when it starts; a
    web process only has the tasks that something happened to import. Validation must not
    call a task unregistered because its module was never imported here, so the loader's
    default modules are imported once per process first.
    """
    if id(app) not in _loaded:
        app.loader.import_default_modules()
        _loaded.add(id(app))
    tasks: Mapping[str, Any] = app.tasks
    return tasks


def unroutable_reason(
    row: DeadLetter,
    app: Any,
    args: Sequence[Any] | None = None,
    kwargs: Mapping[str, Any] | None = None,
) -> str | None:
    """Dry-run validation of a replay: why it cannot be published, or None when it can.

    The task must be registered in ``app`` and the arguments (the stored ones unless given)
    must bind to its current signature.
    """
    task = registered_tasks(app).get(row.task_name)
    if task is None:
        return f"task {row.task_name!r} is not registered in Celery app {app.main!r}"
    return signature_error(
        task, row.args if args is None else args, row.kwargs if kwargs is None else kwargs
    )


def rearm_idempotency(row: DeadLetter) -> bool:
    """Free the idempotency key the dead task holds, so its replay can run; True if freed.

    Released only while the dead letter's own task id holds the key (a run that died with
    its lease, or ``CELERY_GUARD_RELEASE_ON_DEAD_LETTER = False``). A key that a newer task
    has taken since stays taken: if that task succeeded, the replay is skipped by the worker
    as a duplicate of work that already ran. A key in state ``failed`` or ``released`` needs
    no release: the replay takes it.
    """
    if not row.idempotency_key:
        return False
    return idempotency.release(row.idempotency_key, row.task_id)


def publish_options(
    row: DeadLetter,
    task_id: str,
    args: Sequence[Any] | None = None,
    kwargs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """``send_task`` keyword arguments of a replay: fresh attempt budget, ``replay_of`` set."""
    found = row.replay_options()
    guard = dict(headers.read(found["headers"]))
    guard["replay_of"] = row.pk
    found["headers"] = {**found["headers"], headers.HEADER: guard}
    if args is not None:
        found["args"] = list(args)
    if kwargs is not None:
        found["kwargs"] = dict(kwargs)
    found["task_id"] = task_id
    return found


def _mark_unroutable(row: DeadLetter, reason: str, allowed: Sequence[str]) -> None:
    DeadLetter.objects.filter(pk=row.pk, status__in=allowed).update(
        status=DeadLetter.Status.UNROUTABLE, status_reason=reason
    )
    logger.warning(
        "celery_guard: dead letter %s (%s[%s]) is unroutable: %s",
        row.pk,
        row.task_name,
        row.task_id,
        reason,
    )


def _claim(
    rows: Sequence[DeadLetter],
    user: str,
    allowed: Sequence[str],
    args: Sequence[Any] | None,
    kwargs: Mapping[str, Any] | None,
) -> dict[int, DeadLetterReplay]:
    """Claim ``rows`` for replay in one transaction; return the replay record of each claimed.

    The rows are locked (``SELECT ... FOR UPDATE``) and updated only while their status is
    still replayable: of two concurrent claims of a row, the second waits for the first to
    commit, then finds the row ``replayed`` and does not claim it. Only claimed rows are
    published, so a row is published at most once per claim.
    """
    edited = args is not None or kwargs is not None
    with transaction.atomic():
        # Locked in id order, so two claims of overlapping batches cannot deadlock.
        locked = set(
            DeadLetter.objects.select_for_update()
            .filter(pk__in=[row.pk for row in rows], status__in=allowed)
            .order_by("pk")
            .values_list("pk", flat=True)
        )
        if not locked:
            return {}
        records = [
            DeadLetterReplay(
                dead_letter_id=row.pk,
                task_id=str(uuid.uuid4()),
                replayed_by=user,
                edited=edited,
                args=list(row.args if args is None else args),
                kwargs=dict(row.kwargs if kwargs is None else kwargs),
            )
            for row in rows
            if row.pk in locked
        ]
        DeadLetter.objects.filter(pk__in=locked, status__in=allowed).update(
            status=DeadLetter.Status.REPLAYED,
            status_reason=Case(
                *(
                    When(pk=r.dead_letter_id, then=Value(f"replayed as {r.task_id}"))
                    for r in records
                ),
                default=Value("replayed"),
            ),
        )
        DeadLetterReplay.objects.bulk_create(records)
    return {record.dead_letter_id: record for record in records}


def _revert(rows: Sequence[DeadLetter], records: Mapping[int, DeadLetterReplay]) -> None:
    """Undo the claim of ``rows`` whose replay was not published."""
    with transaction.atomic():
        DeadLetterReplay.objects.filter(
            task_id__in=[records[row.pk].task_id for row in rows]
        ).delete()
        for row in rows:
            DeadLetter.objects.filter(pk=row.pk, status=DeadLetter.Status.REPLAYED).update(
                status=row.status, status_reason=row.status_reason
            )


def _publish(
    row: DeadLetter,
    record: DeadLetterReplay,
    app: Any,
    producer: Any,
    args: Sequence[Any] | None,
    kwargs: Mapping[str, Any] | None,
) -> None:
    rearm_idempotency(row)
    options = publish_options(row, record.task_id, args, kwargs)
    app.send_task(row.task_name, producer=producer, **options)
    shown = redaction.redact(options["args"], options["kwargs"], task_name=row.task_name)
    logger.info(
        "celery_guard: replayed dead letter %s (%s[%s]) as %s by %s%s: args %s kwargs %s",
        row.pk,
        row.task_name,
        row.task_id,
        record.task_id,
        record.replayed_by or "?",
        " with edited arguments" if record.edited else "",
        shown["args"],
        shown["kwargs"],
    )


def replay_rows(
    rows: Sequence[DeadLetter],
    *,
    app: Any,
    summary: Summary,
    user: str = "",
    args: Sequence[Any] | None = None,
    kwargs: Mapping[str, Any] | None = None,
    dry_run: bool = False,
    allowed: Sequence[str] = REPLAYABLE,
    producer: Any = None,
    pace: Callable[[], None] | None = None,
) -> None:
    """Replay ``rows``, recording each outcome in ``summary``.

    A row whose status is not in ``allowed`` is skipped. One that fails validation is marked
    unroutable (unless ``dry_run``) and nothing is published for it. The others are claimed
    together (status ``replayed`` and a :class:`DeadLetterReplay` each, one transaction; rows
    claimed meanwhile by someone else are skipped), their idempotency keys re-armed and their
    messages published under new task ids.

    Args:
        rows: Dead letters as loaded (their status is re-checked by the claim).
        app: The Celery app to publish with.
        summary: Where the outcomes, new task ids and unroutable reasons are recorded.
        user: Who replays (recorded).
        args: Edited positional arguments (the stored ones when None).
        kwargs: Edited keyword arguments (the stored ones when None).
        dry_run: Validate only; change and publish nothing.
        allowed: Statuses a row may be replayed from.
        producer: A kombu producer to publish with (bulk replays share one).
        pace: Called before each publish (a rate limiter's ``acquire``).

    Raises:
        Exception: A publish failed; the claims of that row and of the rows of ``rows`` not
            published yet were undone first.
    """
    ready = []
    for row in rows:
        if row.status not in allowed:
            summary.add(SKIPPED)
            continue
        reason = unroutable_reason(row, app, args, kwargs)
        if reason is not None:
            if not dry_run:
                _mark_unroutable(row, reason, allowed)
            summary.reasons[row.pk] = reason
            summary.add(UNROUTABLE)
        elif dry_run:
            summary.add(REPLAYED)
        else:
            ready.append(row)
    if not ready:
        return
    records = _claim(ready, user, allowed, args, kwargs)
    claimed = [row for row in ready if row.pk in records]
    for _ in range(len(ready) - len(claimed)):
        summary.add(SKIPPED)
    for index, row in enumerate(claimed):
        if pace is not None:
            pace()
        try:
            _publish(row, records[row.pk], app, producer, args, kwargs)
        except Exception:
            logger.exception(
                "celery_guard: publishing the replay of dead letter %s (%s[%s]) failed; it "
                "and %d more not published yet are dead again",
                row.pk,
                row.task_name,
                row.task_id,
                len(claimed) - index - 1,
            )
            _revert(claimed[index:], records)
            raise
        summary.task_ids[row.pk] = records[row.pk].task_id
        summary.add(REPLAYED)


def replay_one(
    row: DeadLetter,
    *,
    app: Any,
    summary: Summary | None = None,
    **options: Any,
) -> str:
    """Replay one dead letter (see :func:`replay_rows` for ``options``).

    Returns:
        ``"replayed"``, ``"skipped"`` or ``"unroutable"``.
    """
    summary = summary if summary is not None else Summary()
    before = (summary.replayed, summary.skipped)
    replay_rows([row], app=app, summary=summary, **options)
    if summary.replayed > before[0]:
        return REPLAYED
    return SKIPPED if summary.skipped > before[1] else UNROUTABLE


def replay(
    ids: Iterable[int],
    *,
    app: Any,
    user: str = "",
    dry_run: bool = False,
    pace: Callable[[], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> Summary:
    """Replay the dead letters ``ids`` in batches; rows not dead or unroutable are skipped.

    Args:
        ids: Dead letter ids, in the order to replay them.
        app: The Celery app to publish with.
        user: Who replays (recorded on each replay).
        dry_run: Validate only.
        pace: Called before each publish (a rate limiter's ``acquire``).
        progress: Called with the number of dead letters done so far, after each batch.
    """
    summary = Summary()
    ids = list(ids)
    with app.producer_or_acquire() as producer:
        for start in range(0, len(ids), BATCH):
            chunk = ids[start : start + BATCH]
            found = DeadLetter.objects.in_bulk(chunk)
            for _ in range(len(chunk) - len(found)):  # purged meanwhile
                summary.add(SKIPPED)
            replay_rows(
                [found[pk] for pk in chunk if pk in found],
                app=app,
                summary=summary,
                user=user,
                dry_run=dry_run,
                producer=producer,
                pace=pace,
            )
            if progress is not None:
                progress(summary.total)
    return summary


_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:/\s*([smh]))?\s*$")


def parse_rate(text: str) -> float:
    """Messages per second of a rate like ``"200/s"``, ``"600/m"``, ``"10/h"`` or ``"50"``.

    Raises:
        ValueError: ``text`` is not such a rate, or it is not positive.
    """
    match = _RATE.match(text)
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"rate must look like 200/s, 600/m or 10/h, got {text!r}")
    per = {"s": 1, "m": 60, "h": 3600}[match.group(2) or "s"]
    return float(match.group(1)) / per


class TokenBucket:
    """Paces calls to ``rate`` per second on average, with bursts of at most ``burst``.

    Args:
        rate: Tokens added per second.
        burst: Bucket size; the bucket starts with one token, so the first call is immediate.
        clock: Monotonic clock (injected by tests).
        sleep: Sleep function (injected by tests).
    """

    def __init__(
        self,
        rate: float,
        burst: float = 1,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.rate = rate
        self.burst = max(burst, 1)
        self.clock = clock
        self.sleep = sleep
        self.tokens = 1.0
        self.last = clock()

    def acquire(self) -> None:
        """Take one token, sleeping until one is available."""
        while True:
            now = self.clock()
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
            self.last = now
            # The epsilon absorbs float rounding, which could otherwise leave 0.999... tokens
            # and sleeps too short to move the clock.
            if self.tokens >= 1 - 1e-9:
                self.tokens = max(self.tokens - 1, 0.0)
                return
            self.sleep((1 - self.tokens) / self.rate)
