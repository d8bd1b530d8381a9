"""The Redis protocol (RESP) for the hot paths that send a known script without redis-py's call."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis import exceptions as redis_errors


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


class KeptConnections:
    """A client's connections kept between hot-path script calls, and those calls.

    The pool's checkout (its lock, connection-state bookkeeping and a readiness poll of the
    socket) and redis-py's ``Script`` call (its retry and event machinery) cost more CPU than
    the rest of a ledger call or a limits admission: :meth:`evalsha` sends the packed
    ``EVALSHA`` itself on a connection kept here. A connection is given back only once its
    reply was read (or after ``disconnect()``), so one taken here never holds unread data; a
    stale one fails on use and the ``Script`` fallback reconnects. The owner empties it
    (:meth:`forget`) in a forked child, whose parent's sockets these are.
    """

    def __init__(self, client: Any) -> None:
        self.client = client
        self.idle: list[Any] = []
        #: ``EVALSHA <sha> <numkeys>``, packed once per script and key count.
        self._heads: dict[tuple[str, int], bytes] = {}

    def take(self) -> Any:
        """A connection for one command and its reply; give it back with :meth:`give`."""
        try:
            return self.idle.pop()
        except IndexError:
            return connection(self.client.connection_pool)

    def give(self, conn: Any) -> None:
        """Keep ``conn`` for the next call (its reply read, or disconnected)."""
        self.idle.append(conn)

    def forget(self) -> None:
        """Drop the kept connections (in a forked child: the parent's sockets)."""
        self.idle = []

    def evalsha(self, script: Any, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run the registered ``script`` (redis-py's ``Script``): one round trip.

        Anything unusual (the script not loaded, a connection gone stale) takes the
        ``Script`` call, which loads the script and reconnects.
        """
        packed = self._heads.get((script.sha, len(keys)))
        if packed is None:
            packed = self._heads[(script.sha, len(keys))] = head("EVALSHA", script.sha, len(keys))
        size = 3 + len(keys) + len(args)
        conn = self.take()
        try:
            conn.send_packed_command([b"*%d\r\n%s%s" % (size, packed, bulk((*keys, *args)))])
            return conn.read_response()
        except redis_errors.NoScriptError:
            pass  # replied: the connection is clean
        except redis_errors.ResponseError:
            raise  # the script's own error, replied: the connection is clean
        except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError):
            conn.disconnect()  # the fallback reconnects, or raises that Redis is down
        except BaseException:
            conn.disconnect()  # interrupted mid-reply: the reply would be read by the next
            raise
        finally:
            self.give(conn)
        return script(keys=list(keys), args=list(args))
