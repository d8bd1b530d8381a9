"""The Redis protocol (RESP) for the hot paths that send a known script without redis-py's call."""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Sequence
from typing import Any

from redis import exceptions as redis_errors

logger = logging.getLogger(__name__)

#: A command sent by :meth:`KeptConnections.send` whose reply is unread: the script, its
#: keys and arguments, and what it does (for the log).
_Unread = tuple[Any, Sequence[str], Sequence[Any], str]

#: Seconds between two reads of the replies left unread, by this process's flusher thread.
FLUSH_TICK = 0.25

#: What a lost (or stale) connection raises.
_LOST = (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError)


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
    ``EVALSHA`` itself on a connection kept here, and :meth:`send` sends one whose answer
    nobody waits for (read with the connection's next use, or by :meth:`flush`). A kept
    connection is either clean or holds only the unread replies of its :meth:`send` calls,
    which :meth:`take` reads first; a stale one fails on use and the ``Script`` fallback
    reconnects. A forked child empties every one (:meth:`forget`): its parent's sockets.
    """

    def __init__(self, client: Any) -> None:
        self.client = client
        self.idle: list[Any] = []
        #: ``EVALSHA <sha> <numkeys>``, packed once per script and key count.
        self._heads: dict[tuple[str, int], bytes] = {}
        #: Per connection (by identity), the commands :meth:`send` sent whose replies are
        #: unread, oldest first: (script, keys, args, what it was, for the log).
        self._unread: dict[int, list[_Unread]] = {}
        #: Held while a connection changes hands or its unread replies are read: the
        #: flusher thread may :meth:`flush` while the owner calls.
        self._lock = threading.Lock()
        _kept.add(self)

    def take(self) -> Any:
        """A connection for one command and its reply; give it back with :meth:`give`.

        The connection's unread replies (of :meth:`send`) are read first, so the caller
        reads its own.
        """
        conn, unread = self._take()
        if unread:
            self._read_unread(conn, unread)
        return conn

    def give(self, conn: Any) -> None:
        """Keep ``conn`` for the next call (its reply read, or disconnected)."""
        with self._lock:
            self.idle.append(conn)

    def forget(self) -> None:
        """Drop the kept connections (in a forked child: the parent's sockets)."""
        self.idle = []
        self._unread = {}
        self._lock = threading.Lock()  # the parent's may have been held by a thread

    def flush(self) -> None:
        """Read the replies :meth:`send` left unread (logging failures, resending).

        The process's flusher thread calls it every :data:`FLUSH_TICK`, so a failed command
        is known within a tick, not at the next call. The lock is held throughout: a call
        meanwhile waits, and takes the connection its predecessor's commands went on.
        """
        if not self._unread:
            return
        with self._lock:
            for conn in self.idle:
                unread = self._unread.pop(id(conn), None)
                if unread:
                    self._read_unread(conn, unread)

    def evalsha(self, script: Any, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run the registered ``script`` (redis-py's ``Script``): one round trip.

        Sent before the connection's unread replies (of :meth:`send`) are read, so it
        waits for them and its own in one round trip. Anything unusual (the script not
        loaded, a connection gone stale) takes the ``Script`` call, which loads the script
        and reconnects.
        """
        conn, unread = self._take()
        if not self._send(conn, unread, self._packed(script, keys, args)):
            return script(keys=list(keys), args=list(args))
        try:
            if unread and not self._read_unread(conn, unread):
                raise redis_errors.ConnectionError("lost with the replies before it")
            return conn.read_response()
        except redis_errors.NoScriptError:
            pass  # replied: the connection is clean
        except redis_errors.ResponseError:
            raise  # the script's own error, replied: the connection is clean
        except _LOST:
            conn.disconnect()  # the fallback reconnects, or raises that Redis is down
        except BaseException:
            conn.disconnect()  # interrupted mid-reply: the reply would be read by the next
            raise
        finally:
            self.give(conn)
        return script(keys=list(keys), args=list(args))

    def send(self, script: Any, keys: Sequence[str], args: Sequence[Any], what: str) -> None:
        """Send the registered ``script`` without waiting for its reply.

        For an idempotent script whose result the caller does not need: Redis runs it in the
        order of the connection's commands, so the next call on this connection comes after
        it. Its reply is read later (by that call, or by the flusher thread within
        :data:`FLUSH_TICK`): an error is logged with ``what``, and a script Redis did not
        know (``NOSCRIPT``) or a connection lost before the reply is run again through the
        ``Script`` call, which is why it must be idempotent.

        Raises:
            redis.RedisError: The command could not be sent nor run by the fallback.
        """
        global _flusher
        entry = (script, keys, args, what)
        conn, unread = self._take()
        if not self._send(conn, unread, self._packed(script, keys, args)):
            script(keys=list(keys), args=list(args))
            return
        if not _flusher:
            _flusher = True
            threading.Thread(target=_flush_kept, name="celery-guard-replies", daemon=True).start()
        with self._lock:
            self._unread[id(conn)] = [*(unread or ()), entry]
            self.idle.append(conn)

    def _send(self, conn: Any, unread: list[_Unread] | None, command: bytes) -> bool:
        """Send ``command`` on ``conn``; False (``conn`` given back) if it could not be sent.

        A connection that failed is disconnected, and the commands whose replies it held
        unread are run again (they may or may not have run: they are idempotent).
        """
        try:
            conn.send_packed_command([command])
            return True
        except BaseException as exc:
            conn.disconnect()  # part of a command may have been written
            self.give(conn)
            for again in unread or ():
                _run_again(*again)
            if isinstance(exc, _LOST):
                return False
            raise

    def _take(self) -> tuple[Any, list[_Unread] | None]:
        """A kept connection (or a new one) and its unread replies, taken over by the caller."""
        with self._lock:
            try:
                conn = self.idle.pop()
            except IndexError:
                return connection(self.client.connection_pool), None
            return conn, self._unread.pop(id(conn), None) if self._unread else None

    def _packed(self, script: Any, keys: Sequence[str], args: Sequence[Any]) -> bytes:
        packed = self._heads.get((script.sha, len(keys)))
        if packed is None:
            packed = self._heads[(script.sha, len(keys))] = head("EVALSHA", script.sha, len(keys))
        return b"*%d\r\n%s%s" % (3 + len(keys) + len(args), packed, bulk((*keys, *args)))

    @staticmethod
    def _read_unread(conn: Any, unread: list[_Unread]) -> bool:
        """Read ``conn``'s unread replies, oldest first; False if the connection was lost.

        A lost one is disconnected, and the commands whose replies were unread are run again
        (they may or may not have run: they are idempotent).
        """
        for i, (script, keys, args, what) in enumerate(unread):
            try:
                conn.read_response()
            except redis_errors.NoScriptError:
                _run_again(script, keys, args, what)  # not run: run it now
                continue
            except redis_errors.ResponseError:
                logger.warning("celery_guard: %s failed in Redis", what, exc_info=True)
                continue
            except BaseException as exc:
                # Lost with the connection, or interrupted mid-reply (a time limit).
                conn.disconnect()
                for again in unread[i:]:
                    _run_again(*again)
                if isinstance(exc, _LOST):
                    return False
                raise
        return True


def _run_again(script: Any, keys: Sequence[str], args: Sequence[Any], what: str) -> None:
    try:
        script(keys=list(keys), args=list(args))
    except Exception:
        logger.warning("celery_guard: %s could not reach Redis", what, exc_info=True)


#: Every :class:`KeptConnections` of the process, for the flusher thread.
_kept: weakref.WeakSet[KeptConnections] = weakref.WeakSet()
#: Whether this process started its flusher thread (with its first unanswered command).
_flusher = False


def _flush_kept() -> None:
    """The flusher thread: reads the replies left unread, every :data:`FLUSH_TICK`."""
    while True:
        time.sleep(FLUSH_TICK)
        for kept in list(_kept):
            try:
                kept.flush()
            except Exception:
                logger.warning("celery_guard: could not read Redis's replies", exc_info=True)


def _in_child() -> None:
    """A forked child has neither its parent's flusher thread nor the use of its sockets."""
    global _flusher
    _flusher = False
    for kept in list(_kept):
        kept.forget()


os.register_at_fork(after_in_child=_in_child)
