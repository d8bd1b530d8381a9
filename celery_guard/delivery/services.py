"""Every state change of outbox rows and scheduled messages, and the public ``publish_at``.

``publish_at`` is the one entry point for "publish this message at time T": retries,
countdowns and ETAs of guarded tasks come through it, and so can other features (deferrals
of over-limit tasks, bulk runs). See ``docs/delivery.md``.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone
from typing import Any

from django.db import DatabaseError, connections, router, transaction
from django.db.models import Q
from django.utils import timezone
from kombu.exceptions import OperationalError as KombuOperationalError
from redis.exceptions import RedisError

from celery_guard.conf import guard_settings
from celery_guard.delivery import schedule
from celery_guard.delivery.models import OutboxMessage, OutboxState

logger = logging.getLogger(__name__)

#: Celery options whose values are datetimes (kept as ISO text in a row).
_DATETIMES = ("eta", "expires")
#: Until when (monotonic) the fast path leaves rows to the poller after a failed publish.
_fast_path_paused_until = 0.0
#: Errors that mean the broker or the database is down: the poller stops the batch, backs off.
OUTAGES: tuple[type[BaseException], ...] = (
    KombuOperationalError,
    OSError,
    DatabaseError,
    RedisError,
)
#: Seconds the fast path stays off after a failure (one warning per outage, no waiting).
FAST_PATH_PAUSE = 2.0


def _jsonable(options: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(options)
    for name in _DATETIMES:
        if isinstance(out.get(name), datetime):
            out[name] = out[name].isoformat()
    return out


def _restored(options: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(options)
    for name in _DATETIMES:
        if isinstance(out.get(name), str):
            out[name] = datetime.fromisoformat(out[name])
    return out


def publish_at(app: Any, due: float, publish: Callable[[Any], Any], row: Mapping[str, Any]) -> None:
    """Publish a message at ``due`` (epoch seconds), ahead of the backlog of its queue.

    Args:
        app: The Celery app.
        due: When the message is due.
        publish: ``publish(producer)`` publishes the message through Celery with that producer
            (or the default one when ``None``), without ``countdown``/``eta``.
        row: The call, as :class:`OutboxMessage` fields (``task_name``, ``task_id``, ``args``,
            ``kwargs``, ``options``, ``headers``, ``guard``, ``queue``, ``attempt``): used by
            the database schedule, which publishes the row when due.
    """
    if schedule.backend_name(app) == "redis":
        schedule.RedisSchedule(app).hold(due, publish)
        return
    now = timezone.now()
    fields = {**row, "options": _jsonable(row.get("options") or {}), "prepared": True}
    OutboxMessage.objects.create(
        created_at=now, due_at=datetime.fromtimestamp(due, tz=dt_timezone.utc), **fields
    )


def add_row(
    task_name: str,
    task_id: str,
    args: Sequence[Any] | None,
    kwargs: Mapping[str, Any] | None,
    options: Mapping[str, Any],
    *,
    headers: Mapping[str, Any] | None = None,
    guard: Mapping[str, Any] | None = None,
    idempotency_key: str = "",
    prepared: bool = False,
    due_now: bool = False,
) -> OutboxMessage:
    """Write one outbox row in the current transaction (of the router's write alias).

    Nothing is published here: the caller publishes the committed row with
    :func:`publish_now`, and the poller publishes it after ``CELERY_GUARD_OUTBOX_GRACE`` if that
    did not happen (the writer died, the broker was down).

    Args:
        options: Celery options of the publish, without ``task_id``, ``headers``, ``guard``.
        prepared: The headers are final: publish with ``send_task``, not through the task's
            ``apply_async`` (and its guard pipeline).
        due_now: Nobody publishes it at once: the poller takes it on its next poll.
    """
    now = timezone.now()
    grace = 0.0 if due_now else guard_settings.outbox_grace
    return OutboxMessage.objects.using(router.db_for_write(OutboxMessage)).create(
        task_name=task_name,
        task_id=task_id,
        args=list(args or ()),
        kwargs=dict(kwargs or {}),
        options=_jsonable(options),
        headers=dict(headers or {}),
        guard=dict(guard or {}),
        idempotency_key=idempotency_key,
        queue=str(options.get("queue") or ""),
        prepared=prepared,
        created_at=now,
        due_at=now + timedelta(seconds=grace),
    )


def write_outbox(
    task: Any,
    args: Sequence[Any] | None,
    kwargs: Mapping[str, Any] | None,
    options: Mapping[str, Any],
    *,
    idempotency_key: str,
) -> OutboxMessage:
    """Write the outbox row of a call in the caller's transaction; publish it after the commit.

    With ``CELERY_GUARD_OUTBOX_FAST_PATH = False`` nothing is published after the commit: the
    row is due at once and the delivery poller publishes it.

    Args:
        options: Celery options of the call (``guard`` and ``headers`` included).
        idempotency_key: The key the call publishes and runs under (the row's own identity
            when the task has none), so a second publish of the row is harmless.
    """
    opts = dict(options)
    guard = opts.pop("guard", None)
    message_headers = opts.pop("headers", None)
    task_id = str(opts.pop("task_id", None) or uuid.uuid4())
    fast_path = guard_settings.outbox_fast_path
    row = add_row(
        task.name,
        task_id,
        args,
        kwargs,
        opts,
        headers=message_headers,
        guard=guard,
        idempotency_key=idempotency_key,
        due_now=not fast_path,
    )
    if not fast_path:
        return row
    transaction.on_commit(
        lambda: publish_now(task.app, row), using=router.db_for_write(OutboxMessage)
    )
    return row


def publish_now(app: Any, row: OutboxMessage, *, producer: Any = None) -> bool:
    """The fast path: publish a committed row at once; on failure leave it to the poller, quietly.

    One connection attempt only (kombu would otherwise retry for seconds inside the user's
    request), and after a failure the fast path stays off for ``FAST_PATH_PAUSE`` seconds.

    Returns:
        Whether the row was published (and marked dispatched).
    """
    global _fast_path_paused_until
    if time.monotonic() < _fast_path_paused_until:
        return False
    try:
        with app.producer_or_acquire(producer) as through:
            through.connection.ensure_connection(max_retries=0)
            _publish(app, row, retry=False, producer=through)
        OutboxMessage.objects.filter(pk=row.pk, state=OutboxState.PENDING).update(
            state=OutboxState.DISPATCHED, dispatched_at=timezone.now()
        )
    except Exception as exc:
        if not _fast_path_paused_until:
            logger.warning(
                "celery_guard: could not publish outbox row %s (%s[%s]) after the commit (%s); "
                "the delivery poller will publish it",
                row.pk,
                row.task_name,
                row.task_id,
                exc,
            )
        _fast_path_paused_until = time.monotonic() + FAST_PATH_PAUSE
        return False
    if _fast_path_paused_until:
        logger.warning("celery_guard: outbox fast path publishes again")
    _fast_path_paused_until = 0.0
    return True


def _publish(
    app: Any,
    row: OutboxMessage,
    *,
    retry: bool = True,
    producer: Any = None,
    due_queues: schedule.DueQueues | None = None,
) -> None:
    task = app.tasks.get(row.task_name)
    if row.prepared:
        # A scheduled message went through the guard pipeline when it was scheduled; running
        # it again would count the publish twice (and meet the key its own attempt holds).
        options = _restored(row.options)
        if due_queues is not None:
            options = due_queues.redirect(row.task_name, row.args, row.kwargs, options)
        app.send_task(
            row.task_name,
            row.args,
            row.kwargs,
            task_id=row.task_id,
            headers=row.headers,
            task_type=task,
            retry=retry,
            producer=producer,
            **options,
        )
        return
    if task is None:
        raise KeyError(row.task_name)
    task.apply_async(
        row.args,
        row.kwargs,
        task_id=row.task_id,
        guard=row.guard or None,
        headers=row.headers or None,
        retry=retry,
        producer=producer,
        **_restored(row.options),
    )


def claim_due(batch: int, lease: float) -> tuple[str, list[OutboxMessage]]:
    """Claim up to ``batch`` due pending rows for this process; return the claim and rows.

    Candidates are read with ``FOR UPDATE SKIP LOCKED`` where the database has it; the claim
    itself is one conditional ``UPDATE`` (an unclaimed or expired claim only), so two pollers
    never both own a row, on SQLite too.
    """
    now = timezone.now()
    free = Q(claimed_until__isnull=True) | Q(claimed_until__lt=now)
    token = uuid.uuid4().hex
    using = router.db_for_write(OutboxMessage)
    with transaction.atomic(using=using):
        candidates = (
            OutboxMessage.objects.using(using)
            .filter(free, state=OutboxState.PENDING, due_at__lte=now)
            .order_by("due_at")
        )
        if connections[using].features.has_select_for_update_skip_locked:
            candidates = candidates.select_for_update(skip_locked=True)
        ids = list(candidates.values_list("pk", flat=True)[:batch])
        if ids:
            OutboxMessage.objects.using(using).filter(free, pk__in=ids).update(
                claim=token, claimed_until=now + timedelta(seconds=lease)
            )
    if not ids:
        return token, []
    rows = OutboxMessage.objects.using(using).filter(claim=token, state=OutboxState.PENDING)
    return token, list(rows.order_by("due_at"))


def publish_claimed(app: Any, rows: Sequence[OutboxMessage]) -> int:
    """Publish claimed rows in due order and mark them dispatched; return how many.

    A row is marked after its publish: a poller killed in between leaves its claim to expire
    and the row is published again, a duplicate its idempotency identity makes harmless.

    Raises:
        Exception: The first broker or database error (``OUTAGES``): the rows not yet
            published stay pending, with the error noted, for the next poll. Any other error
            is noted on its row, which stays pending, and the batch goes on.
    """
    if not rows:
        return 0
    done: list[int] = []
    due_queues = schedule.DueQueues(app) if schedule.is_amqp(app) else None
    try:
        # One producer (and broker connection) for the whole batch. Not kombu's
        # Producer.batch(): it pushes at the end of the batch, after the idempotency ledger
        # has recorded each message as published, so a crash before that push would lose
        # the rows (their republish would be taken for a duplicate).
        with app.producer_or_acquire() as producer:
            for row in rows:
                try:
                    _publish(app, row, producer=producer, due_queues=due_queues)
                except KeyError as exc:
                    _note_error(row, f"task {row.task_name!r} is not registered here: {exc}")
                    continue
                except OUTAGES as exc:
                    _note_error(row, f"{type(exc).__name__}: {exc}")
                    raise
                except Exception as exc:
                    # This row's own problem (arguments its task now refuses...): noted for
                    # the admin and tried again next poll, without holding up the rows
                    # behind it.
                    logger.warning(
                        "celery_guard: could not publish outbox row %s (%s[%s]): %r",
                        row.pk,
                        row.task_name,
                        row.task_id,
                        exc,
                    )
                    _note_error(row, f"{type(exc).__name__}: {exc}")
                    continue
                done.append(row.pk)
    finally:
        if done:
            OutboxMessage.objects.filter(pk__in=done).update(
                state=OutboxState.DISPATCHED, dispatched_at=timezone.now(), claim=""
            )
    return len(done)


def _note_error(row: OutboxMessage, error: str) -> None:
    OutboxMessage.objects.filter(pk=row.pk).update(
        last_error=error[:2000], publish_attempts=row.publish_attempts + 1, claimed_until=None
    )


def purge(retention: float | None = None) -> int:
    """Delete dispatched rows older than ``retention`` seconds (the setting by default)."""
    seconds = guard_settings.outbox_retention if retention is None else retention
    cutoff = timezone.now() - timedelta(seconds=seconds)
    deleted, _ = OutboxMessage.objects.filter(
        state=OutboxState.DISPATCHED, dispatched_at__lt=cutoff
    ).delete()
    return int(deleted)
