"""The Redis protocol (RESP) for the hot paths that send a known script without redis-py's call."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def pack(args: Sequence[str | bytes | int | float]) -> bytes:
    """One command in the Redis protocol (RESP), as redis-py encodes its arguments.

    The hot paths' arguments are known strings and numbers: packing them here costs a
    fraction of redis-py's generic encoder.
    """
    return b"*%d\r\n%s" % (len(args), bulk(args))


def bulk(args: Sequence[str | bytes | int | float]) -> bytes:
    """``args`` as RESP bulk strings, one after the other (a command without its header)."""
    raws = [
        a.encode() if type(a) is str else a if type(a) is bytes else _text(a).encode() for a in args
    ]
    return b"".join([b"$%d\r\n%s\r\n" % (len(raw), raw) for raw in raws])


def _text(arg: Any) -> str:
    # What redis-py sends for a number (repr), and for a str subclass its text.
    return arg if isinstance(arg, str) else repr(arg)


def head(command: str, script: str, numkeys: int) -> bytes:
    """``EVAL <script> <numkeys>`` (or ``EVALSHA <sha> <numkeys>``) without the array header.

    Packed once per script (and key count); a call adds its keys and arguments.
    """
    packed = pack((command, script, numkeys))
    return packed[len(b"*3\r\n") :]


def connection(pool: Any) -> Any:
    """A connection of ``pool`` (redis-py before 5.3 wants a command name)."""
    try:
        return pool.get_connection()
    except TypeError:
        return pool.get_connection("EVAL")
