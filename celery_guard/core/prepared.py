"""Statements prepared once per database session (PostgreSQL), for the workers' hot paths.

Parsing and planning a short statement can cost the server more than running it. A statement
sent through :func:`execute_hot` is prepared in the session the first time (``PREPARE`` sent
with its first ``EXECUTE``, one round trip) and only executed afterwards.
"""

from __future__ import annotations

import functools
import logging
import re
import weakref
from collections.abc import Mapping
from typing import Any

from django.db import DatabaseError

logger = logging.getLogger(__name__)

#: Per database session (the driver's connection): the names of the statements prepared in
#: it, ``None`` once preparing failed in it (see :func:`execute_hot`).
_SESSIONS: weakref.WeakKeyDictionary[Any, set[str] | None] = weakref.WeakKeyDictionary()

_PLACEHOLDER = re.compile(r"%\((\w+)\)s")


@functools.lru_cache(maxsize=32)
def _prepared_form(sql: str, constants: tuple[str, ...]) -> tuple[str, tuple[str, ...]]:
    """``sql`` for ``PREPARE``: ``$n`` for its variable parameters, which it returns in order.

    The ``constants`` keep their placeholder, to be bound as literals when preparing.
    """
    order: list[str] = []

    def number(match: re.Match[str]) -> str:
        key = match.group(1)
        if key in constants:
            return match.group(0)
        if key not in order:
            order.append(key)
        return f"${order.index(key) + 1}"

    return _PLACEHOLDER.sub(number, sql), tuple(order)


def _prepares(connection: Any) -> bool:
    """Whether the worker's statements are prepared in this connection's sessions.

    With psycopg 3's client-side binding (Django's default), the only one that sends a
    ``PREPARE`` and its first ``EXECUTE`` in one round trip (the simple query protocol).
    """
    return connection.Database.__name__ == "psycopg" and (
        connection.settings_dict.get("OPTIONS", {}).get("server_side_binding") is not True
    )


def execute_hot(
    connection: Any,
    cursor: Any,
    name: str,
    sql: str,
    params: Mapping[str, Any],
    constants: Mapping[str, str],
    types: Mapping[str, str],
) -> None:
    """Execute a statement a worker sends per task or item, prepared in the database session.

    Parsing and planning these statements costs the server more than running them (the bulk
    runs' outcome CTE most of all, the limits' release too): prepared once per session
    (``PREPARE`` sent with the first ``EXECUTE``, one round trip, one statement as Django
    counts them), they are neither parsed nor planned again (PostgreSQL keeps a generic plan
    after five executions).

    Only for an autocommitted statement: whatever fails (a session that lost its prepared
    statements to ``DISCARD ALL``, a pooler that hands each transaction another server
    session) rolled back the statement's own transaction and no caller's; the statement then
    runs unprepared, once (its own error is the caller's), and this session prepares nothing
    any more. On another database (SQLite) or driver it runs unprepared.

    Args:
        name: The prepared statement's name (one per text of ``sql`` and ``constants``).
        sql: The statement, with ``%(key)s`` placeholders.
        params: Every placeholder's value.
        constants: The placeholders whose value is the same in every execution, bound as
            literals in the prepared statement.
        types: The SQL types of the variable parameters that are not ``text``.
    """
    if not _prepares(connection):  # another driver, or another database (SQLite)
        cursor.execute(sql, params)
        return
    raw = connection.connection
    if raw not in _SESSIONS:
        _SESSIONS[raw] = set()
    session = _SESSIONS[raw]
    if session is None or connection.in_atomic_block or not connection.get_autocommit():
        cursor.execute(sql, params)
        return
    body, order = _prepared_form(sql, tuple(constants))
    execute = f"EXECUTE {name}({', '.join(['%s'] * len(order))})"
    values = [params[key] for key in order]
    try:
        if name in session:
            cursor.execute(execute, values)
        else:
            declared = ", ".join(types.get(key, "text") for key in order)
            prepare = connection.ops.compose_sql(
                f"PREPARE {name} ({declared}) AS {body}", constants
            )
            cursor.execute(f"{prepare.replace('%', '%%')}; {execute}", values)
            cursor.nextset()  # the EXECUTE's result (rows, row count)
            session.add(name)
    except DatabaseError:
        logger.warning(
            "celery_guard: the prepared statement %s failed; running it unprepared",
            name,
            exc_info=True,
        )
        _SESSIONS[raw] = None
        cursor.execute(sql, params)
