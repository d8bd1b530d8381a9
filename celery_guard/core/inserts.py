"""Inserts that skip rows whose unique column exists, in one statement, saying which went in."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from django.db import connections


def insert_new(
    model: Any,
    alias: str,
    fields: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    unique: str,
    returning: str,
) -> list[Any]:
    """``INSERT ... ON CONFLICT (unique) DO NOTHING RETURNING returning`` of ``rows``.

    One round trip and one commit (PostgreSQL, SQLite >= 3.35) for rows that are usually
    new, where a read-then-insert or an insert per row takes several; Django's
    ``bulk_create(ignore_conflicts=True)`` does not tell which rows went in.

    Args:
        model: The model whose table receives the rows.
        alias: The database alias.
        fields: The model field names of the values of each row, in order.
        rows: The values of each row (datetimes are adapted to the database).
        unique: The field whose unique constraint skips a row.
        returning: The field whose value each inserted row returns.

    Returns:
        The ``returning`` values of the rows inserted (not of those skipped).
    """
    if not rows:
        return []
    connection = connections[alias]
    meta = model._meta
    quote = connection.ops.quote_name
    column_of = {field.name: str(field.column) for field in meta.concrete_fields}
    columns = ", ".join(quote(column_of[name]) for name in fields)
    adapt = connection.ops.adapt_datetimefield_value
    values = [adapt(v) if isinstance(v, dt.datetime) else v for row in rows for v in row]
    row = f"({', '.join(['%s'] * len(fields))})"
    sql = (
        f"INSERT INTO {quote(meta.db_table)} ({columns}) VALUES {', '.join([row] * len(rows))} "
        f"ON CONFLICT ({quote(column_of[unique])}) DO NOTHING "
        f"RETURNING {quote(column_of[returning])}"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, values)
        return [value for (value,) in cursor.fetchall()]
