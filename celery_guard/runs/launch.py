"""Starting bulk runs and publishing their items and completion; retry, cancel, sweep.

Publishing happens after the commit that wrote the run, chunk by chunk, and each chunk is
marked published after its messages are out. A process that dies in between leaves items
committed but not marked: the sweep (``celery_guard.sweep_runs``, ``manage.py celery_guard
runs sweep``) publishes them again once the run's publish heartbeat is older than
``CELERY_GUARD_RUNS_SWEEP_GRACE``. A message published twice that way carries the same task
id and idempotency key; the worker runs its body at most once and counts the item once.
"""

from __future__ import annotations

import datetime as dt
import inspect
import logging
import uuid
from collections.abc import Iterable, Iterator, Mapping
from itertools import islice
from typing import Any

from celery import current_app
from celery.canvas import Signature
from django.db import transaction
from django.utils import timezone

from celery_guard.conf import guard_settings
from celery_guard.core import headers, pipeline
from celery_guard.dlq.models import DeadLetter
from celery_guard.exceptions import GuardError, IdempotencyConflict, RunItemError
from celery_guard.failures import handler
from celery_guard.idempotency import dedup, keys, ledger
from celery_guard.runs import reconcile as reconcile_
from celery_guard.runs import services
from celery_guard.runs.models import OPEN_ITEM_STATUSES, BulkRun, BulkRunItem, ItemStatus

logger = logging.getLogger(__name__)

#: Items validated and written per ``bulk_create``, and published per chunk.
CHUNK = 1000
#: Items of the first chunk published: the workers start on them while the keys of the next
#: (full) chunks are claimed, instead of idling until 1,000 keys are.
FIRST_PUBLISH_CHUNK = 50


def _per_call(task: Any, run: BulkRun, seq: int) -> dict[str, Any]:
    """The guard options of an item: a key derived from the run and the item, unless the
    task declares its own (whose dedup then applies across runs: duplicates are skipped)."""
    if task.guard_options.get(keys.IDEMPOTENCY_KEY.name) is not None:
        return {}
    return {keys.IDEMPOTENCY_KEY.name: f"run:{run.uuid.hex}:{seq}"}


def _task_id(run: BulkRun, seq: int | str) -> str:
    return str(uuid.uuid5(run.uuid, str(seq)))


def _rows(task: Any, run: BulkRun, items: Iterable[Any], start: int) -> Iterator[BulkRunItem]:
    """Validate items (raising on the first bad one) and build their rows."""
    try:
        signature = inspect.signature(task.run)
    except (TypeError, ValueError):  # pragma: no cover - a builtin body
        signature = None
    for seq, kwargs in enumerate(items, start):
        if not isinstance(kwargs, Mapping):
            raise RunItemError(
                f"{task.name}: item {seq} must be a mapping of keyword arguments, got "
                f"{type(kwargs).__name__}",
                index=seq,
            )
        try:
            if signature is not None:
                signature.bind(**kwargs)
            fields = task.guard_prepare(None, kwargs, _per_call(task, run, seq))
        except (GuardError, TypeError, ValueError) as exc:
            raise RunItemError(f"{task.name}: item {seq}: {exc}", index=seq) from exc
        identity = keys.Identity.from_header(fields)
        yield BulkRunItem(
            run=run,
            seq=seq,
            kwargs=dict(kwargs),
            task_id=_task_id(run, seq),
            key=identity.key if identity else "",
        )


def start_run(
    task: Any,
    items: Iterable[Mapping[str, Any]],
    *,
    name: str = "",
    initiator: Any = None,
    on_complete: Signature | None = None,
    parent: BulkRun | None = None,
) -> BulkRun:
    """Call a guarded task once per item, as one run with progress, errors and a completion.

    Every item is checked against the task's signature and payload rules while the run and
    its items are written, in chunks, in one transaction: a bad item raises before anything
    is committed or published. The items are published after the commit.

    Args:
        task: A guarded task; each item is one call of it.
        items: Keyword arguments per item (any iterable: it is read once, in chunks).
        name: A name for the run (the admin lists it).
        initiator: The user who started it, or a string.
        on_complete: A signature published once, when every item is final; it finds the
            run's summary with :func:`celery_guard.runs.summary`.
        parent: The run whose failed items this run retries (``retry_failed``).

    Returns:
        The run (``run.pk``, ``run.status``, ``run.total``...).

    Raises:
        TypeError: ``task`` is not a guarded task, or ``on_complete`` not a signature.
        RunItemError: An item is invalid; its ``index`` names it. Nothing was written.
    """
    if not pipeline.is_guarded(task):
        raise TypeError(f"start_run: {getattr(task, 'name', task)!r} is not a guarded task")
    if on_complete is not None and not isinstance(on_complete, Signature):
        raise TypeError(
            f"start_run(on_complete=...): expected a signature such as task.si(...), got "
            f"{type(on_complete).__name__}"
        )
    complete = dict(on_complete) if on_complete is not None else None
    iterator = iter(items)
    with transaction.atomic():
        run = services.create(
            task_name=task.name, name=name, initiator=initiator, on_complete=complete, parent=parent
        )
        rows = _rows(task, run, iterator, 0)
        while chunk := list(islice(rows, CHUNK)):
            services.add_items(run, chunk)
        if services.seal(run):
            logger.info("celery_guard: run %s has no items; finished at once", run.pk)
            transaction.on_commit(lambda: complete_quietly(run.pk))
        else:
            # After the commit (of the caller's transaction too): a worker must find the rows.
            transaction.on_commit(lambda: publish_items(run))
    logger.info("celery_guard: run %s of %s: %d item(s)", run.pk, task.name, run.total)
    run.refresh_from_db()
    return run


def _app() -> Any:
    return current_app._get_current_object()


def publish_items(run: BulkRun) -> int:
    """Publish the run's pending items not marked published yet; return how many were sent.

    A publish that fails is logged and stops here: the run stays unpublished, and the sweep
    publishes the rest once ``CELERY_GUARD_RUNS_SWEEP_GRACE`` has passed.
    """
    app = _app()
    task = app.tasks[run.task_name]
    sent = 0
    last = -1
    unpublished = BulkRunItem.objects.filter(
        run_id=run.pk, published=False, status=ItemStatus.PENDING
    ).order_by("seq")
    size = min(FIRST_PUBLISH_CHUNK, CHUNK)
    try:
        with app.producer_or_acquire() as producer:
            while True:
                chunk = list(
                    unpublished.filter(seq__gt=last).values_list("pk", "seq", "kwargs", "task_id")[
                        :size
                    ]
                )
                if not chunk:
                    break
                sent += _publish_chunk(task, run, chunk, producer)
                last = chunk[-1][1]
                size = CHUNK
    except Exception:
        logger.exception(
            "celery_guard: publishing the items of run %s failed after %d message(s); the "
            "run is saved and the sweep publishes the rest",
            run.pk,
            sent,
        )
        return sent
    services.mark_all_published(run.pk)
    return sent


def _publish_chunk(task: Any, run: BulkRun, chunk: list[Any], producer: Any) -> int:
    """Publish one chunk of items: their keys claimed together, then one message each.

    The keys are claimed with one ledger operation for the chunk (``dedup.claimed_together``)
    and confirmed with one more, instead of two round trips per item. An item whose key is
    held by another call is ``skipped`` (same arguments, or ``idempotency_conflict="ignore"``)
    or ``failed`` (other arguments: ``IdempotencyConflict``), and not published.
    """
    calls = [
        (pk, seq, kwargs, task_id, keys.identify(task, None, kwargs, _per_call(task, run, seq)))
        for pk, seq, kwargs, task_id in chunk
    ]
    published: list[int] = []
    skipped: list[int] = []
    conflicts: list[tuple[int, IdempotencyConflict]] = []
    with dedup.claimed_together(
        task, [(task_id, identity) for *_, task_id, identity in calls]
    ) as claims:
        for pk, seq, kwargs, task_id, identity in calls:
            claim = claims.get(task_id)
            try:
                publish = (
                    claim is None
                    or identity is None
                    or dedup.note_claim(task, identity, task_id, claim)
                )
            except IdempotencyConflict as refused:
                conflicts.append((pk, refused))
                continue
            if publish:
                header = {headers.HEADER: {headers.RUN: {"run": run.pk, "item": pk}}}
                task.apply_async(
                    kwargs=kwargs,
                    task_id=task_id,
                    headers=header,
                    guard=_per_call(task, run, seq),
                    producer=producer,
                )
            else:
                skipped.append(pk)
            published.append(pk)
    services.mark_published(run.pk, published)
    finished = False
    for pk, exc in conflicts:
        _, last = services.finish_item(
            run.pk,
            pk,
            ItemStatus.FAILED,
            error_class=f"{type(exc).__module__}.{type(exc).__qualname__}",
            error_message=str(exc),
        )
        finished = finished or last
    if skipped and services.finish_items(
        run.pk, skipped, ItemStatus.SKIPPED, "deduplicated: the idempotency key is held"
    ):
        finished = True
    if finished:
        complete_quietly(run.pk)
    return len(published) - len(skipped)


def complete_quietly(run_id: int) -> None:
    """Publish the completion; a failure is logged, and the sweep publishes it later."""
    try:
        publish_completion(run_id)
    except Exception:
        logger.exception(
            "celery_guard: could not publish the completion of run %s; the sweep will", run_id
        )


def publish_completion(run_id: int) -> str | None:
    """Publish the completion signature of a finished run; return its task id.

    Called by the one process whose update finished the run (or the sweep that claimed it
    after ``CELERY_GUARD_RUNS_SWEEP_GRACE``). The message has a task id derived from the
    run and, for a guarded task, an idempotency key derived from it too: should a publisher
    die after the publish and before recording it, the sweep's second publish is dropped by
    the key (for a plain Celery task the body may then run twice: at-least-once).
    """
    run = BulkRun.objects.get(pk=run_id)
    if run.on_complete is None or run.completion_published_at is not None:
        return None
    app = _app()
    signature = Signature(run.on_complete, app=app)
    task_id = _task_id(run, "complete")
    options: dict[str, Any] = {}
    guard_header = {headers.RUN: {"run": run.pk, "complete": True, "summary": run.summary()}}
    extra = dict(signature.options.get("headers") or {})
    extra[headers.HEADER] = {**dict(extra.get(headers.HEADER) or {}), **guard_header}
    if pipeline.is_guarded(app.tasks.get(signature.task)):
        options["guard"] = {keys.IDEMPOTENCY_KEY.name: f"run:{run.uuid.hex}:complete"}
    signature.apply_async(task_id=task_id, headers=extra, **options)
    services.completion_published(run.pk, task_id)
    logger.info("celery_guard: run %s %s; completion %s published", run.pk, run.status, task_id)
    return task_id


def summary(task_or_request: Any) -> dict[str, Any] | None:
    """The summary of the run whose completion is running (``summary(self)`` in its body).

    Returns:
        ``{"run", "name", "task", "status", "total", "succeeded", "failed", "skipped",
        "cancelled", "started_at", "finished_at"}``, or None outside a run's completion.
    """
    request = getattr(task_or_request, "request", task_or_request)
    entry = headers.read(getattr(request, "headers", None)).get(headers.RUN)
    if isinstance(entry, Mapping) and isinstance(entry.get("summary"), Mapping):
        return dict(entry["summary"])
    return None


def cancel(run: BulkRun, *, initiator: Any = None) -> int:
    """Stop a run: items not started become cancelled; return how many.

    Items already running finish and are counted as they end; their messages still queued
    are dropped by the worker, which finds them cancelled. The completion is published when
    the last item is final.
    """
    count, finished = services.cancel(run, initiator=initiator)
    if finished:
        complete_quietly(run.pk)
    return count


def retry_failed(run: BulkRun, *, initiator: Any = None) -> BulkRun:
    """Start a child run of exactly the failed items of ``run`` (same task and completion).

    Raises:
        ValueError: The run has no failed items.
    """
    failed = BulkRunItem.objects.filter(run_id=run.pk, status=ItemStatus.FAILED)
    if not failed.exists():
        raise ValueError(f"run #{run.pk} has no failed items to retry")
    task = _app().tasks[run.task_name]
    if task.guard_options.get(keys.IDEMPOTENCY_KEY.name) is not None:
        # The task's own keys outlive the run: a failed item's key may still be held by its
        # message (a lost one, or with CELERY_GUARD_RELEASE_ON_DEAD_LETTER off), and the
        # child's claim would take the retry for a duplicate. (Keys derived from the run
        # are new in the child.) A key that succeeded stays: its effect committed.
        for key, task_id in failed.exclude(key="").values_list("key", "task_id").iterator():
            dedup.release(key, task_id, keep_succeeded=True)
    on_complete = Signature(run.on_complete, app=_app()) if run.on_complete else None
    child = start_run(
        task,
        failed.order_by("seq").values_list("kwargs", flat=True).iterator(chunk_size=CHUNK),
        name=f"{run.name or run.task_name} (retry of #{run.pk})"[:255],
        initiator=initiator,
        on_complete=on_complete,
        parent=run,
    )
    services.record_retry(run, child, initiator)
    return child


def sweep() -> dict[str, int]:
    """Publish what a dead process left unpublished, and settle items whose message is gone.

    Items of runs whose publisher stopped are published; completions claimed but never
    recorded as published are published; open items whose message is gone are given their
    outcome or published again (:func:`reconcile`). Returns the counts: ``items`` published
    (lost ones again included) and ``completions``.
    """
    cutoff = timezone.now() - dt.timedelta(seconds=guard_settings.runs_sweep_grace)
    items = completions = 0
    stalled = BulkRun.objects.filter(published=False, publish_heartbeat__lt=cutoff)
    for pk, heartbeat in stalled.values_list("pk", "publish_heartbeat"):
        if services.claim_publishing(pk, heartbeat):
            logger.warning("celery_guard: sweep publishes the rest of run %s", pk)
            items += publish_items(BulkRun.objects.get(pk=pk))
    items += reconcile()["republished"]
    unconfirmed = BulkRun.objects.filter(
        finished_at__isnull=False,
        completion_published_at=None,
        completion_claimed_at__lt=cutoff,
    )
    for pk, claimed in unconfirmed.values_list("pk", "completion_claimed_at"):
        if services.claim_completion(pk, claimed):
            logger.warning("celery_guard: sweep publishes the completion of run %s", pk)
            complete_quietly(pk)
            completions += 1
    return {"items": items, "completions": completions}


#: Open items the sweep examines per run and sweep (in chunks of :data:`CHUNK`).
RECONCILE_LIMIT = 5000
#: Error class of an item whose message was lost too often (``reconcile``).
MESSAGE_LOST = "celery_guard.runs.MessageLost"


def reconcile() -> dict[str, int]:
    """Settle the open items of published runs whose message is gone.

    The ledger record of each item's key tells whether a message may still come
    (:func:`celery_guard.runs.reconcile.verdict`). An item whose key succeeded is recorded
    ``succeeded`` (``skipped`` when another call's), one whose message was dead-lettered
    without its outcome recorded is ``failed`` with its dead letter, and one whose message
    is lost is published again, same task id and key (at most once per attempt: past the
    task's ``max_attempts`` plus ``CELERY_GUARD_MAX_WORKER_LOST`` deliveries it is
    ``failed`` as :data:`MESSAGE_LOST`), so no run stays ``running`` for ever.

    Returns:
        ``{"republished", "succeeded", "skipped", "failed"}`` counts.
    """
    counts = dict.fromkeys(("republished", "succeeded", "skipped", "failed"), 0)
    now = timezone.now()
    grace = dt.timedelta(seconds=guard_settings.runs_sweep_grace)
    runs = BulkRun.objects.filter(
        finished_at=None, published=True, publish_heartbeat__lt=now - grace
    )
    for run in runs.iterator():
        task = _app().tasks.get(run.task_name)
        if task is None or not pipeline.is_guarded(task):
            continue
        for name, count in _reconcile_run(task, run, now).items():
            counts[name] += count
    if any(counts.values()):
        logger.warning("celery_guard: sweep settled items whose message was gone: %s", counts)
    return counts


def _reconcile_run(task: Any, run: BulkRun, now: dt.datetime) -> dict[str, int]:
    policy = handler.policy_for(task)
    stale = dedup.start_within(task, 0.0) + guard_settings.runs_sweep_grace
    recent = now - dt.timedelta(seconds=stale)
    progressing = BulkRunItem.objects.filter(run_id=run.pk, finished_at__gte=recent).exists()
    bounds = reconcile_.Bounds(now, stale, policy.backoff.longest(), progressing)
    # A moving run's pending items wait their turn: only its running ones can be stuck.
    statuses = [ItemStatus.RUNNING] if progressing else list(OPEN_ITEM_STATUSES)
    rows = list(
        BulkRunItem.objects.filter(run_id=run.pk, published=True, status__in=statuses)
        .exclude(key="")
        .order_by("seq")
        .values_list("pk", "seq", "kwargs", "task_id", "key", "attempts")[:RECONCILE_LIMIT]
    )
    counts = dict.fromkeys(("republished", "succeeded", "skipped", "failed"), 0)
    store = ledger.get_ledger()
    cap = policy.max_attempts + guard_settings.max_worker_lost
    for start in range(0, len(rows), CHUNK):
        chunk = rows[start : start + CHUNK]
        records = store.get_many([row[4] for row in chunk])
        lost = []
        for pk, seq, kwargs, task_id, key, attempts in chunk:
            decided = reconcile_.verdict(task_id, records.get(key), bounds)
            if decided in (reconcile_.SUCCEEDED, reconcile_.SKIPPED):
                status = ItemStatus(decided)
                note = "" if decided == reconcile_.SUCCEEDED else "deduplicated: the key succeeded"
                counts[decided] += _settle(run.pk, pk, status, error_message=note)
            elif decided in (reconcile_.LOST, reconcile_.FAILING):
                lost.append((pk, seq, kwargs, task_id, attempts, decided))
        letters = dict(
            DeadLetter.objects.filter(task_id__in=[row[3] for row in lost])
            .order_by("id")
            .values_list("task_id", "pk")
        )
        again = []
        for pk, seq, kwargs, task_id, attempts, decided in lost:
            if task_id in letters:
                counts["failed"] += _settle(
                    run.pk,
                    pk,
                    ItemStatus.FAILED,
                    error_class=DeadLetter.objects.get(pk=letters[task_id]).exception_class,
                    error_message="dead-lettered; its outcome was recorded by the sweep",
                    dead_letter_id=letters[task_id],
                )
            elif decided == reconcile_.FAILING:
                continue  # its retry may still come
            elif attempts >= cap:
                counts["failed"] += _settle(
                    run.pk,
                    pk,
                    ItemStatus.FAILED,
                    error_class=MESSAGE_LOST,
                    error_message=(
                        f"its message was lost after {attempts} deliveries (its worker died, "
                        "and no redelivery came); retry failed items to run it again"
                    ),
                )
            else:
                again.append((pk, seq, kwargs, task_id))
        if again:
            logger.warning(
                "celery_guard: sweep publishes %d item(s) of run %s again: their message is gone",
                len(again),
                run.pk,
            )
            with _app().producer_or_acquire() as producer:
                counts["republished"] += _publish_chunk(task, run, again, producer)
    return counts


def _settle(run_id: int, item_id: int, status: ItemStatus, **outcome: Any) -> int:
    """Record an item's outcome for the sweep; publish the completion if it was the last."""
    moved, finished = services.finish_item(run_id, item_id, status, **outcome)
    if finished:
        complete_quietly(run_id)
    return int(moved)
