"""Every change of state of a bulk run or of its items (the one place that makes them).

Counters are columns of the run, changed in the transaction that moves an item to a final
status, by a conditional UPDATE on the item (``WHERE status IN (pending, running)``): an
item leaves its open statuses once, whoever reports it and however often, so each item is
counted once and ``succeeded + failed + skipped + cancelled = total`` once the run ends.
The run's row lock serializes the counter updates, so exactly one transaction sees the last
item become final: it marks the run finished and claims the completion in the same UPDATE.

On PostgreSQL a worker's two writes per item are one statement each (``start_item``: the
item's UPDATE; ``finish_item``: the item's UPDATE and the run's counters, finish and claim in
one statement, a data-modifying CTE), so the run's row is locked only for that statement,
and both commit asynchronously (:func:`_quick`) and are prepared in each session
(:func:`_execute_hot`); elsewhere (SQLite) the same changes are made by several statements in
one transaction.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from django.db import connections, router, transaction
from django.db.models import Case, F, Max, Q, Value, When
from django.db.models.functions import Coalesce
from django.utils import timezone

from celery_guard.core import audit, prepared
from celery_guard.runs.models import (
    COUNTERS,
    FINISHED_RUN_STATUSES,
    OPEN_ITEM_STATUSES,
    BulkRun,
    BulkRunItem,
    ItemStatus,
    RunStatus,
)

logger = logging.getLogger(__name__)

#: Longest stored error message (characters).
MAX_ERROR_MESSAGE = 2000


def initiator_name(initiator: Any) -> str:
    """How an initiator (a user, a string, or None) is stored on the run."""
    if initiator is None:
        return ""
    if isinstance(initiator, str):
        return initiator[:255]
    name = getattr(initiator, "get_username", None)
    return str(name() if callable(name) else initiator)[:255]


def audit_user(initiator: Any) -> Any:
    """The Django user to audit a change under, when the initiator is one."""
    return None if initiator is None or isinstance(initiator, str) else initiator


def _all_final() -> Q:
    return Q(total=F("succeeded") + F("failed") + F("skipped") + F("cancelled"))


def _final_status() -> Case:
    return Case(
        When(status=RunStatus.CANCELLED, then=Value(RunStatus.CANCELLED)),
        When(failed__gt=0, then=Value(RunStatus.COMPLETED_WITH_ERRORS)),
        default=Value(RunStatus.SUCCEEDED),
    )


def _finish_if_done(run_id: int) -> bool:
    """Mark the run finished when every item is final; True for the one caller that does.

    Runs in the transaction that counted the last item (the run's row is locked by it), so
    of two workers finishing the last two items only the second sees ``total`` reached.
    """
    now = timezone.now()
    finished = BulkRun.objects.filter(_all_final(), pk=run_id, finished_at=None).update(
        status=_final_status(),
        finished_at=now,
        started_at=Coalesce(F("started_at"), Value(now)),
        completion_claimed_at=Case(
            When(on_complete__isnull=False, then=Value(now)), default=Value(None)
        ),
    )
    return bool(finished)


def _fast_connection() -> Any:
    """The connection of the items' database when one statement per transition serves it.

    PostgreSQL: data-modifying CTEs, and an UPDATE that waits for a locked row re-reads it
    before computing its new values, so one statement moves an item and counts it exactly.
    """
    connection = connections[router.db_for_write(BulkRunItem)]
    if connection.vendor != "postgresql" or router.db_for_write(BulkRun) != connection.alias:
        return None
    return connection


#: The status names the statements below compare with (parameters, not SQL literals).
_STATUS_PARAMS = {
    "pending": str(ItemStatus.PENDING),
    "running": str(ItemStatus.RUNNING),
    "run_cancelled": str(RunStatus.CANCELLED),
    "run_succeeded": str(RunStatus.SUCCEEDED),
    "run_with_errors": str(RunStatus.COMPLETED_WITH_ERRORS),
}


#: The constants of the prepared statements (bound as literals when preparing).
_START_CONSTANTS = {"pending": _STATUS_PARAMS["pending"], "running": _STATUS_PARAMS["running"]}
_FINISH_CONSTANTS = {status: {**_STATUS_PARAMS, "status": str(status)} for status in COUNTERS}


def _tables(connection: Any) -> tuple[str, str]:
    """The items' and the runs' tables, quoted for ``connection``."""
    quote = connection.ops.quote_name
    return quote(BulkRunItem._meta.db_table), quote(BulkRun._meta.db_table)


@contextlib.contextmanager
def _item_cursor(connection: Any) -> Iterator[Any]:
    """A cursor for a worker's item writes, kept for the database session.

    Django's ``cursor()`` (a health check, a new driver cursor and its wrapper, then its
    close) costs a worker about as much as binding the statement: the wrapper is kept per
    session (the driver connection it was made for), and still runs Django's execute path
    (its wrappers, its error translation). While Django logs queries (``DEBUG``, a test's
    ``CaptureQueriesContext``), whose cursor is chosen when it is made, a new one each time.
    """
    if connection.queries_logged:
        with connection.cursor() as cursor:
            yield cursor
        return
    kept = getattr(connection, "_celery_guard_item_cursor", None)
    if kept is None or kept[0] is not connection.connection or connection.connection is None:
        cursor = connection.cursor()  # opens the connection if it is closed
        kept = connection._celery_guard_item_cursor = (connection.connection, cursor)
    yield kept[1]


def _finish_form(status: ItemStatus, noted: bool) -> tuple[str, bool]:
    """The prepared statement's name, and its form, of an outcome (see :func:`_finish_sql`).

    A failure, a skip, a cancel always carry an error or a reason: one form each, with those
    parameters. A success carries none, but for a note (a task that ignored itself): the form
    without them, and the one with them under a name of its own.
    """
    name = f"celery_guard_item_{COUNTERS[status]}"
    if status != ItemStatus.SUCCEEDED:
        return name, True
    return (f"{name}_noted", True) if noted else (name, False)


#: A CTE that makes the statement's own transaction commit without waiting for the WAL
#: flush (``synchronous_commit = off``, transaction-local): see :func:`_quick`.
_QUICK = "quick AS (SELECT set_config('synchronous_commit', 'off', true) AS off)"


def _quick(connection: Any) -> bool:
    """Whether a worker's item write may commit asynchronously (see ``docs/runs.md``).

    A synchronous commit waits for the disk (milliseconds), twice per item. An asynchronous
    one is as atomic and as isolated, and is on disk within ``wal_writer_delay`` (3 x 200 ms
    at most), and at once when any later transaction commits synchronously (the flush is
    sequential): only a crash of the database server in that window loses it, and what it
    loses the sweep restores from what is on disk (the key's ledger record, the dead letter).
    Never inside the caller's transaction: the setting would cover all of it.
    """
    return not connection.in_atomic_block


#: Types of the parameters of the prepared statements (the others are text).
_PARAM_TYPES = {"item": "bigint", "now": "timestamptz", "dead_letter": "bigint"}

#: A worker's per-item statement, prepared in the database session (see
#: :func:`celery_guard.core.prepared.execute_hot`).
_execute_hot = functools.partial(prepared.execute_hot, types=_PARAM_TYPES)


@functools.lru_cache(maxsize=16)
def _start_sql(quick: bool, item: str) -> str:
    """One item's start: open -> running, one more attempt (one autocommitted statement).

    Built once per form (``item``: the quoted table name): the same string object each time
    is also what keeps the prepared form's cache look-up cheap (its hash is kept).
    """
    return (
        ("WITH {quick} " if quick else "")
        + "UPDATE {item} SET status = %(running)s, attempts = attempts + 1, "
        "started_at = COALESCE(started_at, %(now)s) "
        + ("FROM quick " if quick else "")
        + "WHERE id = %(item)s AND status IN (%(pending)s, %(running)s)"
    ).format(quick=_QUICK, item=item)


@functools.lru_cache(maxsize=64)
def _finish_sql(counter: str, quick: bool, noted: bool, item: str, run: str) -> str:
    """One item's final outcome, counted on its run, in one statement (one round trip).

    The CTE moves the item if it is open; the UPDATE of the run joins its result, so it
    counts only a moved item. ``last``: this increment makes every item final (the SET
    expressions read the row as it is when the lock is granted, so of two statements
    finishing the last two items only the second sees it). It returns one row when the item
    moved, whose value says whether this statement finished the run.

    Args:
        noted: The outcome carries an error (class, message, dead letter) as parameters;
            otherwise those columns are set to their empty values in the text (a success:
            three parameters fewer to bind per item).
        item: The items' table (quoted); ``run``: the runs' table.
    """
    if counter not in COUNTERS.values():  # a column name goes into the SQL: only ours
        raise ValueError(f"{counter!r} is not a counter of a run")
    failed_after = "r.failed + 1" if counter == "failed" else "r.failed"
    last = (
        "(r.succeeded + r.failed + r.skipped + r.cancelled + 1 = r.total AND r.finished_at IS NULL)"
    )
    error = (
        "error_class = %(error_class)s, error_message = %(error_message)s, "
        "dead_letter_id = %(dead_letter)s "
        if noted
        else "error_class = '', error_message = '', dead_letter_id = NULL "
    )
    return (
        ("WITH {quick}, " if quick else "WITH ") + "moved AS ("
        "UPDATE {item} SET status = %(status)s, finished_at = %(now)s, "
        + error
        + ("FROM quick " if quick else "")
        + "WHERE id = %(item)s AND status IN (%(pending)s, %(running)s) RETURNING run_id) "
        "UPDATE {run} AS r SET {counter} = r.{counter} + 1, "
        "status = CASE WHEN {last} THEN CASE "
        "WHEN r.status = %(run_cancelled)s THEN %(run_cancelled)s "
        "WHEN {failed_after} > 0 THEN %(run_with_errors)s "
        "ELSE %(run_succeeded)s END ELSE r.status END, "
        "finished_at = CASE WHEN {last} THEN %(now)s ELSE r.finished_at END, "
        "started_at = CASE WHEN {last} THEN COALESCE(r.started_at, %(now)s) "
        "ELSE r.started_at END, "
        "completion_claimed_at = CASE WHEN {last} THEN CASE "
        "WHEN r.on_complete IS NOT NULL THEN %(now)s END "
        "ELSE r.completion_claimed_at END "
        "FROM moved WHERE r.id = moved.run_id "
        "RETURNING r.finished_at IS NOT DISTINCT FROM %(now)s "
        "AND r.succeeded + r.failed + r.skipped + r.cancelled = r.total"
    ).format(
        counter=counter, last=last, failed_after=failed_after, quick=_QUICK, item=item, run=run
    )


def create(
    *,
    task_name: str,
    name: str,
    initiator: Any,
    on_complete: dict[str, Any] | None,
    parent: BulkRun | None = None,
) -> BulkRun:
    """Create a queued run without items (call in the transaction that adds them)."""
    return BulkRun.objects.create(
        task_name=task_name,
        name=name[:255],
        initiator=initiator_name(initiator),
        on_complete=on_complete,
        parent=parent,
    )


def add_items(run: BulkRun, rows: Sequence[BulkRunItem]) -> None:
    """Insert one chunk of item rows and count them into the run's total."""
    BulkRunItem.objects.bulk_create(rows)
    BulkRun.objects.filter(pk=run.pk).update(total=F("total") + len(rows))
    run.total += len(rows)


def seal(run: BulkRun) -> bool:
    """End the creation of a run (in its transaction); a run without items finishes at once."""
    return _finish_if_done(run.pk)


def mark_published(run_id: int, item_ids: Iterable[int]) -> None:
    """Record that these items' messages were published; beat the run's publish heartbeat."""
    ids = list(item_ids)
    if ids:
        BulkRunItem.objects.filter(pk__in=ids).update(published=True)
    BulkRun.objects.filter(pk=run_id).update(publish_heartbeat=timezone.now())


def mark_all_published(run_id: int) -> None:
    """Every item of the run is published: the sweep leaves it alone."""
    BulkRun.objects.filter(pk=run_id).update(published=True, publish_heartbeat=timezone.now())


def claim_publishing(run_id: int, heartbeat: dt.datetime) -> bool:
    """Take over the publishing of a run whose publisher stopped beating (the sweep)."""
    return bool(
        BulkRun.objects.filter(pk=run_id, published=False, publish_heartbeat=heartbeat).update(
            publish_heartbeat=timezone.now()
        )
    )


def start_item(run_id: int, item_id: int, *, mark_run: bool) -> bool:
    """A worker starts a delivery of an item; False when the item is final already.

    Args:
        mark_run: Also move the run from queued to running (once per process and run).
    """
    now = timezone.now()
    connection = _fast_connection()
    if connection is not None:
        with _item_cursor(connection) as cursor:
            _execute_hot(
                connection,
                cursor,
                "celery_guard_item_start",
                _start_sql(_quick(connection), _tables(connection)[0]),
                {**_START_CONSTANTS, "item": item_id, "now": now},
                _START_CONSTANTS,
            )
            started = cursor.rowcount
    else:
        started = BulkRunItem.objects.filter(pk=item_id, status__in=OPEN_ITEM_STATUSES).update(
            status=ItemStatus.RUNNING,
            attempts=F("attempts") + 1,
            started_at=Coalesce(F("started_at"), Value(now)),
        )
    if started and mark_run:
        BulkRun.objects.filter(pk=run_id, status=RunStatus.QUEUED).update(
            status=RunStatus.RUNNING, started_at=now
        )
    return bool(started)


def uncount_attempt(item_id: int) -> None:
    """Take back the attempt a delivery counted when it turned out not to run (a deferral)."""
    BulkRunItem.objects.filter(pk=item_id, attempts__gt=0).update(attempts=F("attempts") - 1)


def finish_item(
    run_id: int,
    item_id: int,
    status: ItemStatus,
    *,
    error_class: str = "",
    error_message: str = "",
    dead_letter_id: int | None = None,
) -> tuple[bool, bool]:
    """Move an open item to a final status and count it, once.

    Returns:
        ``(moved, finished)``: whether this call moved the item (False: it was final
        already), and whether it was the run's last item (the caller then publishes the
        completion, after the commit).
    """
    if status not in COUNTERS:
        raise ValueError(f"{status!r} is not a final item status")
    counter = COUNTERS[status]
    connection = _fast_connection()
    if connection is not None:
        now = timezone.now()
        constants = _FINISH_CONSTANTS[status]
        name, noted = _finish_form(
            status, bool(error_class or error_message or dead_letter_id is not None)
        )
        params: dict[str, Any] = {**constants, "item": item_id, "now": now}
        if noted:
            params.update(
                error_class=error_class[:255],
                error_message=error_message[:MAX_ERROR_MESSAGE],
                dead_letter=dead_letter_id,
            )
        quick = _quick(connection)
        item_table, run_table = _tables(connection)
        with _item_cursor(connection) as cursor:
            _execute_hot(
                connection,
                cursor,
                name,
                _finish_sql(counter, quick, noted, item_table, run_table),
                params,
                constants,
            )
            row = cursor.fetchone()
            if row is None:
                return False, False
            if row[0] and quick:
                # The run's end, and the completion's claim, are on disk before anyone acts
                # on them: a synchronous commit flushes the WAL up to itself, past ours.
                cursor.execute(
                    f"UPDATE {run_table} SET finished_at = finished_at WHERE id = %(run)s",
                    {"run": run_id},
                )
        return True, bool(row[0])
    with transaction.atomic():
        moved = BulkRunItem.objects.filter(pk=item_id, status__in=OPEN_ITEM_STATUSES).update(
            status=status,
            finished_at=timezone.now(),
            error_class=error_class[:255],
            error_message=error_message[:MAX_ERROR_MESSAGE],
            dead_letter_id=dead_letter_id,
        )
        if not moved:
            return False, False
        BulkRun.objects.filter(pk=run_id).update(**{counter: F(counter) + 1})
        return True, _finish_if_done(run_id)


def finish_items(run_id: int, item_ids: Sequence[int], status: ItemStatus, reason: str) -> bool:
    """Move several open items of one run to ``status`` (publish-side skips); see above."""
    counter = COUNTERS[status]
    with transaction.atomic():
        moved = BulkRunItem.objects.filter(
            run_id=run_id, pk__in=item_ids, status__in=OPEN_ITEM_STATUSES
        ).update(status=status, finished_at=timezone.now(), error_message=reason)
        if not moved:
            return False
        BulkRun.objects.filter(pk=run_id).update(**{counter: F(counter) + moved})
        return _finish_if_done(run_id)


def cancel(run: BulkRun, *, initiator: Any = None) -> tuple[int, bool]:
    """Cancel a run: its pending items become cancelled; running ones finish as they do.

    Returns:
        ``(cancelled items, finished)``; ``finished`` when that ended the run (the caller
        publishes the completion after the commit).
    """
    who = initiator_name(initiator)
    with transaction.atomic():
        locked = BulkRun.objects.select_for_update().get(pk=run.pk)
        if locked.status in FINISHED_RUN_STATUSES:
            return 0, False
        BulkRun.objects.filter(pk=run.pk).update(status=RunStatus.CANCELLED, cancelled_by=who)
        count = BulkRunItem.objects.filter(run_id=run.pk, status=ItemStatus.PENDING).update(
            status=ItemStatus.CANCELLED,
            finished_at=timezone.now(),
            error_message=f"cancelled by {who or 'an operator'}",
        )
        BulkRun.objects.filter(pk=run.pk).update(cancelled=F("cancelled") + count)
        finished = _finish_if_done(run.pk)
        audit.log_changes(
            audit_user(initiator), [(locked, f"Cancelled: {count} pending item(s) cancelled.")]
        )
    logger.warning(
        "celery_guard: run %s cancelled by %s: %d pending item(s) cancelled",
        run.pk,
        who or "?",
        count,
    )
    run.refresh_from_db()
    return count, finished


def record_retry(parent: BulkRun, child: BulkRun, initiator: Any) -> None:
    """Audit that ``child`` retries the failed items of ``parent``."""
    audit.log_changes(
        audit_user(initiator),
        [(parent, f"Retried {child.total} failed item(s) as run #{child.pk}.")],
    )


def claim_completion(run_id: int, claimed_at: dt.datetime | None) -> bool:
    """Take over a completion whose publisher did not confirm it (the sweep)."""
    return bool(
        BulkRun.objects.filter(
            pk=run_id, completion_published_at=None, completion_claimed_at=claimed_at
        ).update(completion_claimed_at=timezone.now())
    )


def completion_published(run_id: int, task_id: str) -> None:
    """Record that the completion of the run was published."""
    BulkRun.objects.filter(pk=run_id).update(
        completion_published_at=timezone.now(), completion_task_id=task_id
    )


def purge(days: float, *, now: dt.datetime | None = None) -> int:
    """Delete finished runs (and their items) that finished more than ``days`` ago."""
    cutoff = (now or timezone.now()) - dt.timedelta(days=days)
    old = BulkRun.objects.filter(finished_at__lt=cutoff)
    deleted = 0
    while True:
        ids = list(old.values_list("pk", flat=True)[:100])
        if not ids:
            break
        # Items first, in batches: one cascade over 100,000 rows would be one huge statement.
        while True:
            item_ids = list(
                BulkRunItem.objects.filter(run_id__in=ids).values_list("pk", flat=True)[:5000]
            )
            if not item_ids:
                break
            BulkRunItem.objects.filter(pk__in=item_ids).delete()
        BulkRun.objects.filter(pk__in=ids).delete()
        deleted += len(ids)
    logger.info("celery_guard: purged %d bulk runs finished more than %s days ago", deleted, days)
    return deleted


def stall(task_name: str, now: dt.datetime) -> float | None:
    """Seconds the most stalled unfinished run of ``task_name`` went without progress.

    A run's last progress is the latest of its creation, its first start and the last time
    one of its items became final; ``None`` when the task has no unfinished run.
    """
    rows = (
        BulkRun.objects.filter(
            task_name=task_name,
            status__in=(RunStatus.QUEUED, RunStatus.RUNNING),
            finished_at__isnull=True,
        )
        .annotate(last_item=Max("items__finished_at"))
        .values_list("created_at", "started_at", "last_item")
    )
    worst: float | None = None
    for stamps in rows:
        last = max(stamp for stamp in stamps if stamp is not None)
        stalled = max(0.0, (now - last).total_seconds())
        worst = stalled if worst is None else max(worst, stalled)
    return worst
