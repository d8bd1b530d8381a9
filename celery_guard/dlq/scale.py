"""Scale helpers of the dead-letter changelist: estimated counts and cheap filter choices."""

from __future__ import annotations

import datetime as dt
from typing import Any

from django.contrib import admin
from django.core.paginator import Paginator
from django.db import connections
from django.db.models import Max, Min, QuerySet
from django.utils import timezone
from django.utils.functional import cached_property

#: Filtered changelists count at most this many rows (then show "more than").
COUNT_CAP = 1000
#: Below this estimated size an unfiltered changelist counts exactly.
ESTIMATE_FROM = 10_000
#: Distinct values a filter lists at most.
MAX_CHOICES = 100
#: Pages a changelist offers at most: page N costs an ``OFFSET`` of N pages of rows, so the
#: last of 20,000 pages would walk a million index entries. Filters reach the rest.
MAX_PAGES = 200


def estimated_rows(queryset: QuerySet[Any]) -> int | None:
    """The planner's row estimate of the queryset's table (PostgreSQL only), or None."""
    connection = connections[queryset.db]
    if connection.vendor != "postgresql":
        return None
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT reltuples::bigint FROM pg_class WHERE oid = %s::regclass",
            [queryset.model._meta.db_table],
        )
        row = cursor.fetchone()
    return int(row[0]) if row else None


class EstimatedCountPaginator(Paginator):  # type: ignore[type-arg]
    """A paginator that never runs an exact ``COUNT(*)`` over a large table.

    Unfiltered on PostgreSQL, the count is the planner's estimate (``pg_class.reltuples``,
    kept up to date by autovacuum) when that is at least ``ESTIMATE_FROM``. Otherwise it counts
    at most ``COUNT_CAP + 1`` rows; ``capped`` then tells the template to say "more than".
    """

    capped = False
    estimated = False

    @cached_property
    def count(self) -> int:
        """Number of rows, estimated or capped as described above."""
        queryset = self.object_list
        if not isinstance(queryset, QuerySet):
            return len(queryset)
        if not queryset.query.where:
            estimate = estimated_rows(queryset)
            if estimate is not None and estimate >= ESTIMATE_FROM:
                self.estimated = True
                return estimate
        counted = queryset.order_by()[: COUNT_CAP + 1].count()
        if counted > COUNT_CAP:
            self.capped = True
            return COUNT_CAP
        return int(counted)

    @cached_property
    def num_pages(self) -> int:
        """Pages offered: at most :data:`MAX_PAGES`."""
        pages: int = super().num_pages
        return min(pages, MAX_PAGES)


def distinct_values(queryset: QuerySet[Any], column: str, limit: int = MAX_CHOICES) -> list[Any]:
    """Up to ``limit`` distinct values of an indexed ``column`` of the queryset's table.

    On PostgreSQL a loose index scan (a recursive query that jumps from one value to the
    next through the index): milliseconds at a million rows, where ``SELECT DISTINCT`` reads
    every index entry. Elsewhere a plain ``DISTINCT``.
    """
    model = queryset.model
    connection = connections[queryset.db]
    if connection.vendor != "postgresql":
        values = queryset.order_by(column).values_list(column, flat=True).distinct()[:limit]
        return list(values)
    qn = connection.ops.quote_name
    table, col = qn(model._meta.db_table), qn(model._meta.get_field(column).column)
    sql = (
        f"WITH RECURSIVE t(v) AS ("
        f"(SELECT {col} FROM {table} ORDER BY {col} LIMIT 1) "
        f"UNION ALL SELECT (SELECT {col} FROM {table} WHERE {col} > t.v ORDER BY {col} LIMIT 1) "
        f"FROM t WHERE t.v IS NOT NULL) SELECT v FROM t WHERE v IS NOT NULL LIMIT %s"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, [limit])
        return [row[0] for row in cursor.fetchall()]


class IndexedValuesFilter(admin.AllValuesFieldListFilter):
    """``AllValuesFieldListFilter`` whose choices come from :func:`distinct_values`."""

    def __init__(
        self,
        field: Any,
        request: Any,
        params: Any,
        model: Any,
        model_admin: Any,
        field_path: str,
    ) -> None:
        super().__init__(field, request, params, model, model_admin, field_path)
        choices = distinct_values(model._default_manager.all(), field.name)
        self.lookup_choices = choices  # type: ignore[assignment]


def _truncate(when: dt.datetime, kind: str) -> dt.datetime:
    day = when.replace(hour=0, minute=0, second=0, microsecond=0)
    if kind == "day":
        return day
    return day.replace(day=1) if kind == "month" else day.replace(month=1, day=1)


def _next(start: dt.datetime, kind: str) -> dt.datetime:
    tz = start.tzinfo
    naive = start.replace(tzinfo=None)
    if kind == "day":
        following = naive + dt.timedelta(days=1)
    elif kind == "month":
        following = naive.replace(year=naive.year + naive.month // 12, month=naive.month % 12 + 1)
    else:
        following = naive.replace(year=naive.year + 1)
    return timezone.make_aware(following, tz) if tz is not None else following


class ProbedDatesQuerySet(QuerySet):  # type: ignore[type-arg]
    """A queryset whose ``datetimes()`` probes each period instead of grouping every row.

    The admin's date hierarchy lists the years, months or days that hold rows with
    ``SELECT DISTINCT date_trunc(...)`` over the whole (filtered) table: a full scan at a
    million rows. Here the bounds come from ``MIN``/``MAX`` and each candidate period (at most
    31 in a drill-down) is one ``EXISTS`` range probe on the ``failed_at`` indexes.
    """

    def datetimes(
        self,
        field_name: str,
        kind: str,
        order: str = "ASC",
        tzinfo: dt.tzinfo | None = None,
        **extra: Any,
    ) -> Any:
        """Start of each ``kind`` period (``year``, ``month``, ``day``) that holds rows."""
        if kind not in ("year", "month", "day") or extra:
            return super().datetimes(field_name, kind, order, tzinfo, **extra)  # type: ignore[arg-type]
        bounds = self.aggregate(first=Min(field_name), last=Max(field_name))
        if bounds["first"] is None:
            return []
        zone = tzinfo or timezone.get_current_timezone()
        first = timezone.localtime(bounds["first"], zone)
        last = timezone.localtime(bounds["last"], zone)
        found = []
        start = _truncate(first, kind)
        while start <= last:
            end = _next(start, kind)
            if self.filter(**{f"{field_name}__gte": start, f"{field_name}__lt": end}).exists():
                found.append(start)
            start = end
        return found if order == "ASC" else found[::-1]
