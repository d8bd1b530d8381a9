"""The services a run needs: Redis and a database, given by URL or started by the harness.

Every process the harness starts is recorded in :class:`Services` and stopped by
:meth:`Services.close` (also on Ctrl-C and on errors); nothing else is ever signalled.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from devprocs.embedded import EmbeddedRedis, free_port

BENCH_DB_NAME = "celery_guard_bench"


@dataclass
class Started:
    """A process the harness started, with the function that stops it."""

    name: str
    pid: int
    stop: Callable[[], None]


@dataclass
class Database:
    """The database of the run."""

    engine: str  # "postgresql" or "sqlite"
    origin: str  # how it was obtained, for the report
    url: str | None = None  # PostgreSQL URL of the bench database
    sqlite_path: str | None = None
    notes: list[str] = field(default_factory=list)


def postgres_bindir() -> Path | None:
    """Return the newest ``/usr/lib/postgresql/*/bin`` (or PATH's) with initdb and postgres."""
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: [int(x) for x in Path(p).parent.name.split(".") if x.isdigit()],
        reverse=True,
    )
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(str(Path(initdb).resolve().parent))
    for path in candidates:
        if (Path(path) / "initdb").exists() and (Path(path) / "postgres").exists():
            return Path(path)
    return None


class EmbeddedPostgres:
    """A throwaway PostgreSQL cluster on a free loopback port, in a temporary directory.

    PostgreSQL refuses to run as root; as root the cluster runs as the ``postgres`` user.
    """

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="celery-guard-pg-")
        self.data = Path(self.dir) / "data"
        self.user: str | None = None
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError("running as root and there is no postgres user") from None
            self.user = "postgres"
            shutil.chown(self.dir, user="postgres")
        self._run(
            [
                str(bindir / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
            ]
        )
        self.log = open(Path(self.dir) / "postgres.log", "wb")  # noqa: SIM115
        self.process = subprocess.Popen(
            [
                str(bindir / "postgres"),
                "-D",
                str(self.data),
                "-p",
                str(self.port),
                "-k",
                self.dir,
                "-c",
                "listen_addresses=127.0.0.1",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            user=self.user,
            start_new_session=True,
        )
        self.url = f"postgres://postgres@127.0.0.1:{self.port}/postgres"
        self._wait()

    def _run(self, cmd: list[str]) -> None:
        result = subprocess.run(cmd, capture_output=True, user=self.user, check=False)
        if result.returncode:
            raise RuntimeError(f"{cmd[0]} failed:\n{result.stderr.decode(errors='replace')}")

    def _wait(self, timeout: float = 30) -> None:
        import psycopg

        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"postgres exited with {self.process.returncode}")
            try:
                psycopg.connect(self.url, connect_timeout=1).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise RuntimeError("postgres did not start in time") from None
                time.sleep(0.1)

    def stop(self) -> None:
        """Fast shutdown of this cluster's postmaster (which we started), then remove it."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def _with_db(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


def _create_database(url: str, name: str, *, drop_first: bool) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(url, autocommit=True) as conn:
        if drop_first:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def _drop_database(url: str, name: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


class Services:
    """Obtains Redis and the database for one run and releases exactly what it took."""

    def __init__(self, run_id: str, log: Callable[[str], None] = print) -> None:
        self.run_id = run_id
        self.log = log
        self.started: list[Started] = []
        self._cleanups: list[Callable[[], None]] = []

    def record(self, name: str, pid: int, stop: Callable[[], None]) -> None:
        """Record a process the harness started, to stop it in :meth:`close`."""
        self.started.append(Started(name, pid, stop))
        self.log(f"started {name} (pid {pid})")

    def redis(self) -> tuple[str, str]:
        """Return the Redis URL and its origin: ``REDIS_URL``, or a server started now."""
        url = os.environ.get("REDIS_URL")
        if url:
            return url, "REDIS_URL (shared: other clients may add to the command counts)"
        server = EmbeddedRedis()
        self.record("redis-server", server.process.pid, server.stop)
        return server.url, "started by the harness (dedicated)"

    def database(self, *, sqlite: bool = False) -> Database:
        """Return the run's database: a fresh one on ``DATABASE_URL``'s server, a PostgreSQL
        cluster started now, or a SQLite file when there is neither (or ``sqlite`` asks)."""
        given = None if sqlite else os.environ.get("DATABASE_URL")
        name = f"cgbench_{self.run_id}"
        if given:
            _create_database(given, name, drop_first=False)
            self._cleanups.append(lambda: _drop_database(given, name))
            return Database(
                "postgresql",
                f"DATABASE_URL (database {name} made for the run)",
                url=_with_db(given, name),
            )
        bindir = None if sqlite else postgres_bindir()
        if bindir is not None:
            server = EmbeddedPostgres(bindir)
            self.record(f"postgres ({bindir})", server.process.pid, server.stop)
            _create_database(server.url, BENCH_DB_NAME, drop_first=True)
            return Database(
                "postgresql",
                "started by the harness (dedicated)",
                url=_with_db(server.url, BENCH_DB_NAME),
            )
        path = str(Path(tempfile.gettempdir()) / f"cgbench-{self.run_id}.sqlite3")
        self._cleanups.append(lambda: _unlink_sqlite(path))
        return Database(
            "sqlite",
            "SQLite (asked for)" if sqlite else "SQLite fallback: no DATABASE_URL, no PostgreSQL",
            sqlite_path=path,
            notes=["No PostgreSQL: database figures are SQLite's, not comparable to PostgreSQL."],
        )

    def sqlite_file(self, name: str) -> str:
        """Return the path of a SQLite file for the run, removed (with its WAL) in :meth:`close`."""
        path = str(Path(tempfile.gettempdir()) / f"cgbench-{self.run_id}-{name}.sqlite3")
        self._cleanups.append(lambda: _unlink_sqlite(path))
        return path

    def close(self) -> None:
        """Run the cleanups and stop every recorded process, newest first."""
        for cleanup in reversed(self._cleanups):
            try:
                cleanup()
            except Exception as exc:  # keep releasing the rest
                print(f"cleanup failed: {exc}", file=sys.stderr)
        self._cleanups.clear()
        while self.started:
            proc = self.started.pop()
            try:
                proc.stop()
                self.log(f"stopped {proc.name} (pid {proc.pid})")
            except Exception as exc:
                print(f"stopping {proc.name} failed: {exc}", file=sys.stderr)


def forget_keys(url: str, prefix: str) -> int:
    """Delete every Redis key of this run (they all start with ``prefix``); return how many."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=500))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start : start + 500])
        return len(keys)
    finally:
        client.close()


def _unlink_sqlite(path: str) -> None:
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path + suffix)
