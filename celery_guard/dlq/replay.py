"""Replaying dead letters: validate, claim once, re-arm the key, publish afresh, record it.

Shared by the admin (action, detail button, edit-and-replay) and ``celery_guard replay``.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import re
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from django.db import transaction

from celery_guard.core import audit, headers, redaction
from celery_guard.dlq.models import OPEN_STATUSES, DeadLetter, DeadLetterReplay, Status
from celery_guard.idempotency import dedup
from celery_guard.observability import events

logger = logging.getLogger(__name__)

REPLAYED = "replayed"
SKIPPED = "skipped"
UNROUTABLE = "unroutable"

#: Dead letters claimed and published per transaction.
BATCH = 100
#: With a rate limit, a batch holds at most this many seconds of publishing: its rows stay
#: locked (and, on SQLite, the whole database) until the batch commits.
BATCH_SECONDS = 0.5
#: Columns a replay never reads: left out of the rows it loads (the biggest ones).
UNUSED_FIELDS = ("traceback", "message", "history")


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

    def add(self, outcome: str, count: int = 1) -> None:
        """Count ``count`` dead letters with one outcome."""
        setattr(self, outcome, getattr(self, outcome) + count)

    def __str__(self) -> str:
        return (
            f"{self.replayed} replayed, {self.skipped} skipped (not dead any more, or in "
            f"another replay), {self.unroutable} unroutable"
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


def rearm_idempotency(rows: Sequence[DeadLetter]) -> int:
    """Free the idempotency keys that the dead tasks of ``rows`` hold; return how many.

    Released only while the dead letter's own task id holds its key (a run that died with
    its lease, or ``CELERY_GUARD_RELEASE_ON_DEAD_LETTER = False``). A key that a newer task
    has taken since stays taken: if that task succeeded, the replay is skipped by the worker
    as a duplicate of work that already ran. A key that succeeded stays succeeded, also when
    the dead letter's own task id holds it (a success dead-lettered by an older version, or
    with the release off): its effect committed, and the worker skips the replay. A key in
    state ``failed`` or ``released`` needs no release: the replay takes it.

    Called inside the claim transaction: with the database ledger the release commits with
    the claim, and a worker that receives the replay first waits for it on the ledger row.
    """
    return sum(
        dedup.release(row.idempotency_key, row.task_id, keep_succeeded=True)
        for row in rows
        if row.idempotency_key
    )


def replay_options(row: Any) -> dict[str, Any]:
    """``send_task`` keyword arguments that publish a dead letter's message afresh.

    The replay is a new first publish: a fresh guard header (attempt 1, first enqueue now)
    that keeps the feature fields of the original (priority, idempotency key...).
    """
    message_headers = {**row.headers, headers.HEADER: headers.fresh(headers.read(row.headers))}
    found: dict[str, Any] = {
        "args": list(row.args),
        "kwargs": dict(row.kwargs),
        "headers": message_headers,
        **row.options,
    }
    if row.queue:
        found["queue"] = row.queue
    return found


def publish_options(
    row: DeadLetter,
    task_id: str,
    args: Sequence[Any] | None = None,
    kwargs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """``send_task`` keyword arguments of a replay: fresh attempt budget, ``replay_of`` set."""
    found = replay_options(row)
    guard = dict(headers.read(found["headers"]))
    guard["replay_of"] = row.pk
    found["headers"] = {**found["headers"], headers.HEADER: guard}
    if args is not None:
        found["args"] = list(args)
    if kwargs is not None:
        found["kwargs"] = dict(kwargs)
    found["task_id"] = task_id
    return found


@dataclass
class _Run:
    """What every batch of one replay run shares."""

    app: Any
    summary: Summary
    user: Any
    via: str
    change: str
    args: Sequence[Any] | None
    kwargs: Mapping[str, Any] | None
    producer: Any = None
    pace: Callable[[], None] | None = None

    @property
    def edited(self) -> bool:
        return self.args is not None or self.kwargs is not None

    @property
    def replayed_by(self) -> str:
        """Who replays, as recorded: the user's name, else where the replay came from."""
        return str(self.user.get_username()) if self.user is not None else self.via

    def replayed_message(self, task_id: str) -> str:
        """The admin log message of one replay."""
        edited = " with edited arguments" if self.edited else ""
        via = f" ({self.via})" if self.via else ""
        change = f":\n{self.change}" if self.change else "."
        return f"Replayed{edited} as task {task_id}{via}{change}"


def _routable(rows: Sequence[DeadLetter], run: _Run, *, mark: bool) -> list[DeadLetter]:
    """The rows that pass validation; the others are counted (and marked when ``mark``)."""
    ready, refused = [], defaultdict(list)
    for row in rows:
        reason = unroutable_reason(row, run.app, run.args, run.kwargs)
        if reason is None:
            ready.append(row)
            continue
        refused[reason].append(row.pk)
        run.summary.reasons[row.pk] = reason
        run.summary.add(UNROUTABLE)
        logger.warning(
            "celery_guard: dead letter %s (%s[%s]) is unroutable: %s",
            row.pk,
            row.task_name,
            row.task_id,
            reason,
        )
    if mark:
        # One statement per distinct reason: a removed task makes a whole batch unroutable.
        for reason, pks in refused.items():
            DeadLetter.objects.filter(pk__in=pks).set_status(Status.UNROUTABLE, reason)
        audit.log_changes(
            run.user,
            [
                (row, f"Replay refused, unroutable: {run.summary.reasons[row.pk]}")
                for row in rows
                if row.pk in run.summary.reasons
            ],
        )
    return ready


def _claim(rows: Sequence[DeadLetter], run: _Run) -> list[DeadLetterReplay]:
    """Mark locked ``rows`` replayed and write their replay records (same transaction)."""
    records = [
        DeadLetterReplay(
            dead_letter_id=row.pk,
            task_id=str(uuid.uuid4()),
            replayed_by=run.replayed_by,
            edited=run.edited,
            args=list(row.args if run.args is None else run.args),
            kwargs=dict(row.kwargs if run.kwargs is None else run.kwargs),
        )
        for row in rows
    ]
    DeadLetter.objects.filter(pk__in=[row.pk for row in rows]).set_status(
        Status.REPLAYED, f"replayed by {run.replayed_by}" if run.replayed_by else "replayed"
    )
    DeadLetterReplay.objects.bulk_create(records)
    return records


def _unclaim(rows: Sequence[DeadLetter], records: Sequence[DeadLetterReplay]) -> None:
    """Undo the claim of ``rows`` whose replay was not published (same transaction)."""
    DeadLetterReplay.objects.filter(task_id__in=[record.task_id for record in records]).delete()
    for row in rows:
        DeadLetter.objects.filter(pk=row.pk).set_status(Status(row.status), row.status_reason)


def _publish(row: DeadLetter, record: DeadLetterReplay, run: _Run) -> dict[str, Any]:
    """Publish the replay of ``row``; return the ``send_task`` options it was sent with."""
    options = publish_options(row, record.task_id, run.args, run.kwargs)
    run.app.send_task(row.task_name, producer=run.producer, **options)
    return options


def _log_published(row: DeadLetter, record: DeadLetterReplay, options: dict[str, Any]) -> None:
    if logger.isEnabledFor(logging.INFO):
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


def _dry_run_batch(ids: Sequence[int], run: _Run) -> None:
    rows = list(
        DeadLetter.objects.filter(pk__in=ids, status__in=OPEN_STATUSES).defer(*UNUSED_FIELDS)
    )
    run.summary.add(SKIPPED, len(ids) - len(rows))
    run.summary.add(REPLAYED, len(_routable(rows, run, mark=False)))


def _pipelined(run: _Run) -> contextlib.AbstractContextManager[Any]:
    """Buffer the publishes of one batch and send them together (kombu's ``Producer.batch``).

    One round trip per batch instead of one per message, where the transport supports it
    (Redis); elsewhere, and under a rate limit (whose pacing must reach the broker), each
    publish goes out at once.
    """
    batch = getattr(run.producer, "batch", None)
    if batch is None or run.pace is not None:
        return contextlib.nullcontext()
    manager: contextlib.AbstractContextManager[Any] = batch()
    return manager


def _replay_batch(ids: Sequence[int], run: _Run) -> None:
    """Validate, claim and publish the dead letters ``ids`` in one transaction.

    The rows are locked (``SELECT ... FOR UPDATE SKIP LOCKED``, in id order so overlapping
    batches cannot deadlock) while still replayable; rows gone, not replayable any more or
    locked by a replay in progress elsewhere are skipped. They are marked replayed, their
    messages published, and only then is the claim committed. Of two replays of a row, one
    publishes; a process that dies before the commit leaves its rows as they were, not
    ``replayed`` without a message. Its publishes before the death are then published
    again by the next replay: at least once, like every delivery (an idempotency key makes
    the second run a skip).
    """
    published: list[tuple[DeadLetter, DeadLetterReplay, dict[str, Any]]] = []
    failure: Exception | None = None
    try:
        with transaction.atomic():
            found = (
                DeadLetter.objects.select_for_update(skip_locked=True)
                .filter(pk__in=ids, status__in=OPEN_STATUSES)
                .defer(*UNUSED_FIELDS)
                .order_by("pk")
            )
            locked = {row.pk: row for row in found}
            run.summary.add(SKIPPED, len(ids) - len(locked))
            ready = _routable([locked[pk] for pk in ids if pk in locked], run, mark=True)
            records = _claim(ready, run) if ready else []
            rearm_idempotency(ready)
            # The batch's messages go out in one pipelined round trip when it ends; one that
            # fails then raises here, and the whole claim rolls back (logged below).
            with _pipelined(run):
                for index, (row, record) in enumerate(zip(ready, records, strict=True)):
                    if run.pace is not None:
                        run.pace()
                    try:
                        options = _publish(row, record, run)
                    except Exception as exc:
                        logger.exception(
                            "celery_guard: publishing the replay of dead letter %s (%s[%s]) "
                            "failed; it and %d more not published yet stay as they were",
                            row.pk,
                            row.task_name,
                            row.task_id,
                            len(ready) - index - 1,
                        )
                        _unclaim(ready[index:], records[index:])
                        failure = exc
                        break
                    published.append((row, record, options))
            audit.log_changes(
                run.user,
                [(row, run.replayed_message(record.task_id)) for row, record, _ in published],
            )
    except Exception:
        if published:
            logger.error(
                "celery_guard: %d replays were published but their claim was not committed: "
                "dead letters %s stay replayable, and replaying them again publishes them "
                "again",
                len(published),
                [row.pk for row, _, _ in published],
            )
        raise
    for row, record, options in published:
        run.summary.task_ids[row.pk] = record.task_id
        _log_published(row, record, options)
        events.emit(
            "replayed",
            task_name=row.task_name,
            task_id=row.task_id,
            queue=row.queue or None,
            dead_letter_id=row.pk,
            new_task_id=record.task_id,
            edited=record.edited,
            by=record.replayed_by or None,
        )
    run.summary.add(REPLAYED, len(published))
    if failure is not None:
        raise failure


def batch_size(rate: float | None) -> int:
    """Dead letters per transaction: :data:`BATCH`, fewer when a slow rate would hold locks."""
    if rate is None:
        return BATCH
    return max(1, min(BATCH, int(rate * BATCH_SECONDS)))


def replay(
    ids: Iterable[int],
    *,
    app: Any,
    user: Any = None,
    via: str = "",
    change: str = "",
    args: Sequence[Any] | None = None,
    kwargs: Mapping[str, Any] | None = None,
    dry_run: bool = False,
    rate: float | None = None,
    progress: Callable[[int], None] | None = None,
    summary: Summary | None = None,
) -> Summary:
    """Replay the dead letters ``ids``: the service of the admin and ``celery_guard replay``.

    Each dead letter that is ``dead`` or ``unroutable`` is validated (:func:`unroutable_reason`);
    one that fails is marked ``unroutable`` and nothing is published for it. The others have
    their idempotency keys re-armed and are published afresh under new task ids, in batches
    of one transaction each (:func:`_replay_batch`), with a :class:`DeadLetterReplay` record
    each. Rows in another state, gone, or being replayed by someone else are skipped.

    Args:
        ids: Dead letter ids, in the order to replay them.
        app: The Celery app to publish with.
        user: The Django user who replays: recorded on each replay, and every replay and
            unroutable row gets an entry in the admin log under this user, in the claim's
            transaction. None for no admin log entries.
        via: Where the replay comes from (``"manage.py celery_guard replay"``): added to the
            log entries, and recorded as who replayed when there is no ``user``.
        change: Text appended to each replay's log entry (the diff of edited arguments).
        args: Edited positional arguments for every row (the stored ones when None).
        kwargs: Edited keyword arguments for every row (the stored ones when None).
        dry_run: Validate only; change and publish nothing.
        rate: Publishes per second at most (no limit when None).
        progress: Called with the number of dead letters done so far, after each batch.
        summary: Where to count (a new :class:`Summary` when None).

    Returns:
        The counts, the new task ids and the unroutable reasons.

    Raises:
        Exception: A publish failed. The rows published before it stay replayed; the others
            of its batch are as they were, and later batches were not started.
    """
    summary = summary if summary is not None else Summary()
    ids = list(ids)
    size = batch_size(rate)
    # A dry run publishes nothing: it needs no broker connection.
    with contextlib.nullcontext() if dry_run else app.producer_or_acquire() as producer:
        run = _Run(
            app=app,
            summary=summary,
            user=user,
            via=via,
            change=change,
            args=args,
            kwargs=kwargs,
            producer=producer,
            pace=TokenBucket(rate).acquire if rate is not None else None,
        )
        for start in range(0, len(ids), size):
            chunk = ids[start : start + size]
            if dry_run:
                _dry_run_batch(chunk, run)
            else:
                _replay_batch(chunk, run)
            if progress is not None:
                progress(summary.total)
    return summary


def replay_one(row: DeadLetter, *, app: Any, summary: Summary | None = None, **options: Any) -> str:
    """Replay one dead letter (see :func:`replay` for ``options``).

    Returns:
        ``"replayed"``, ``"skipped"`` or ``"unroutable"``.
    """
    summary = summary if summary is not None else Summary()
    before = (summary.replayed, summary.skipped)
    replay([row.pk], app=app, summary=summary, **options)
    if summary.replayed > before[0]:
        return REPLAYED
    return SKIPPED if summary.skipped > before[1] else UNROUTABLE


_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:/\s*([smh]))?\s*$")


def parse_rate(text: str) -> float:
    """Messages per second of a rate like ``"200/s"``, ``"600/m"``, ``"10/h"`` or ``"50"``.

    Raises:
        ValueError: ``text`` is not such a rate, or it is not positive.
    """
    match = _RATE.match(text)
    if not match or not 0 < float(match.group(1)) < math.inf:
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
