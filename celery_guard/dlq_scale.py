"""Scale helpers of the dead-letter changelist: estimated counts and cheap filter choices."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.core.paginator import Paginator
from django.db import connections
from django.db.models import QuerySet
from django.utils.functional import cached_property

#: Filtered changelists count at most this many rows (then show "more than").
COUNT_CAP = 1000
#: Below this estimated size an unfiltered changelist counts exactly.
ESTIMATE_FROM = 10_000
#: Distinct values a filter lists at most.
MAX_CHOICES = 100


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
