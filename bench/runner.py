"""The measurements: references, enqueue, drain, paced latency and broker command counts.

Each phase runs every variant in turn (A B A B ...) for several repetitions, so slow drifts
of a shared machine land on both sides; figures are kept per repetition and summarized.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sqlite3
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import redis

from bench import dbcount, stats
from bench.cases import Variant
from bench.services import Database
from bench.worker import BenchWorker

#: Commands the harness itself sends inside a measured window and never counts.
IGNORED_COMMANDS = frozenset({"info"})


class BenchError(RuntimeError):
    """A run did not do what it must (messages lost, misrouted, a worker not answering)."""


@dataclass(frozen=True)
class Config:
    """Sizes of one mode."""

    mode: str
    reps: int
    warmup: int
    enqueue_n: int
    drain_noop_n: int
    drain_sleep_n: int
    paced_seconds: float
    paced_min: int
    ping_n: int
    pushpop_n: int
    commit_n: int
    micro_n: int = 300
    #: Admissions and releases counted per limits variant (bench/limit_trips.py): the counts
    #: do not depend on the machine, so a few hundred repeat exactly.
    limit_trips_n: int = 200
    #: Dead letters the changelist is timed at (bench/dlq.py), smallest first.
    dlq_rows: tuple[int, ...] = (100_000,)
    #: Dead letters replayed in bulk.
    dlq_replay_n: int = 5000
    delivery_n: int = 1000
    #: No-op tasks per figure of observability's in-process cost (bench/observability.py).
    observability_n: int = 2000
    #: Items of the timed ``start_run`` (bench/runs.py), and 10 ms tasks per drain.
    runs_n: int = 2000
    runs_drain_n: int = 300
    #: ``start_run``'s peak memory is measured at this many items and at 4 times as many.
    runs_memory_n: int = 1000


QUICK = Config(
    mode="quick",
    reps=3,
    warmup=50,
    enqueue_n=1000,
    drain_noop_n=300,
    drain_sleep_n=120,
    paced_seconds=2.0,
    paced_min=60,
    ping_n=2000,
    pushpop_n=2000,
    commit_n=300,
)
FULL = Config(
    mode="full",
    reps=7,
    warmup=200,
    enqueue_n=5000,
    drain_noop_n=3000,
    drain_sleep_n=600,
    paced_seconds=15.0,
    paced_min=200,
    ping_n=20000,
    pushpop_n=20000,
    commit_n=3000,
    micro_n=2000,
    dlq_rows=(100_000, 1_000_000),
    dlq_replay_n=20_000,
    delivery_n=5000,
    observability_n=10_000,
    runs_n=8000,
    runs_drain_n=1000,
    runs_memory_n=25_000,
)


@dataclass(frozen=True)
class WorkerConfig:
    """One worker configuration the drains are measured under.

    Attributes:
        name: Stable id (the worker's name too).
        title: Label in the report.
        suffix: Appended to the keys of the figures measured under it ("" for the tuned one,
            whose keys are those of earlier results).
        env: Environment of its worker (on top of the run's).
    """

    name: str
    title: str
    suffix: str
    env: dict[str, str]


#: The configurations, side by side in one run: a project that follows the README's quick start
#: and sets nothing else, and one that sets CELERY_DB_REUSE_MAX itself (bench/settings.py).
QUICK_START = WorkerConfig("quick-start", "quick start", "_qs", {"CG_BENCH_DB_REUSE_MAX": ""})
TUNED = WorkerConfig(
    "tuned",
    "tuned",
    "",
    {"CG_BENCH_DB_REUSE_MAX": os.environ.get("CG_BENCH_DB_REUSE_MAX") or "1000"},
)
CONFIGS = (QUICK_START, TUNED)
#: Seconds an idle PostgreSQL backend may keep its statistics before it reports them (15+).
PG_STATS_FLUSH = 1.2


class Runner:
    """Runs every phase for a list of variants on one broker, database and worker."""

    def __init__(
        self,
        config: Config,
        app: Any,
        variants: list[Variant],
        *,
        broker_url: str,
        prefix: str,
        database: Database,
        log: Callable[[str], None],
    ) -> None:
        self.config = config
        self.app = app
        self.variants = variants
        self.prefix = prefix
        self.database = database
        self.log = log
        # Plain client (no key prefix): reads the broker's keys as kombu wrote them.
        self.redis = redis.Redis.from_url(broker_url)
        self.worker: BenchWorker | None = None
        self.workers: dict[str, BenchWorker] = {}
        self._pg: Any = None
        self._ident = itertools.count()
        self.per_run: dict[str, dict[str, list[float]]] = {v.name: {} for v in variants}
        self.commands: dict[str, dict[str, dict[str, float]]] = {v.name: {} for v in variants}
        #: Periodic commits per second by kind, per variant and configuration suffix.
        self.db_periodic: dict[str, dict[str, dict[str, float]]] = {v.name: {} for v in variants}

    # -- broker helpers -------------------------------------------------------------------

    def key(self, name: str) -> str:
        """Return the Redis key kombu uses for ``name`` (the run's global key prefix)."""
        return f"{self.prefix}:{name}"

    def commandstats(self) -> dict[str, int]:
        """Return the broker's command name -> calls, without the harness's own INFO calls."""
        calls = stats.parse_commandstats(self.redis.info("commandstats"))
        return {k: v for k, v in calls.items() if k not in IGNORED_COMMANDS}

    def queue_len(self, queue: str) -> int:
        """Count the messages waiting in ``queue``."""
        return int(self.redis.llen(self.key(queue)))

    def purge(self, queue: str) -> None:
        """Delete the messages of ``queue`` (outside measured windows only)."""
        self.redis.delete(self.key(queue))

    def _record(self, variant: Variant, metric: str, value: float) -> None:
        self.per_run[variant.name].setdefault(metric, []).append(value)

    def _send(self, variant: Variant, kind: str, *args: Any) -> Any:
        # Every call gets a number unique within the run as its last argument, so a case can
        # derive a distinct idempotency key from it in every repetition.
        ident = next(self._ident)
        return variant.send(variant.tasks[kind], (*args, ident), ident)

    def _publish(self, variant: Variant, kind: str, n: int) -> None:
        for _ in range(n):
            self._send(variant, kind)
        length = self.queue_len(variant.queue)
        if length != n:
            raise BenchError(f"{variant.name}: {length} of {n} messages reached {variant.queue!r}")

    def _snapshot(self, queue: str, own: Counter[str]) -> tuple[int, int]:
        """Return (messages waiting in ``queue``, messages unacked), counting the two calls."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.llen(self.key(queue))
        pipe.hlen(self.key("unacked"))
        waiting, unacked = pipe.execute()
        own.update(llen=1, hlen=1)
        return int(waiting), int(unacked)

    def _wait_started(self, queue: str, n: int, own: Counter[str]) -> tuple[float, int]:
        """Wait until the worker takes the first of ``n`` queued messages.

        A consumer added while the worker blocks on its idle queue starts only when that
        blocking pop returns (up to a second), so timing starts here, not at ``add_consumer``.

        Returns:
            When that was first seen, and how many messages were still waiting or in flight.
        """
        deadline = time.perf_counter() + 30
        while True:
            now = time.perf_counter()
            waiting, unacked = self._snapshot(queue, own)
            if waiting < n:
                return now, waiting + unacked
            if now > deadline:
                raise BenchError(f"the worker did not start consuming {queue!r} in 30s")
            time.sleep(0.002)

    def _wait_drained(self, queue: str, own: Counter[str], timeout: float) -> float:
        """Wait until ``queue`` is empty and nothing is unacked; return when that was first seen.

        kombu pops a message before recording it as unacked, so an empty snapshot is
        confirmed by a second one a moment later.
        """
        deadline = time.perf_counter() + timeout
        seen: float | None = None
        while True:
            now = time.perf_counter()
            waiting, unacked = self._snapshot(queue, own)
            if waiting == 0 and unacked == 0:
                if seen is not None:
                    return seen
                seen = now
                time.sleep(0.02)
                continue
            seen = None
            if now > deadline:
                raise BenchError(
                    f"{queue!r} not drained in {timeout:.0f}s "
                    f"({waiting} waiting, {unacked} unacked)"
                )
            time.sleep(0.005)

    # -- references -----------------------------------------------------------------------

    def references(self) -> dict[str, Any]:
        """Measure the physical limits: Redis round trip, push/pop of a Celery-sized message,
        and single-row commits of the database."""
        cfg = self.config
        pings = []
        for _ in range(200):  # connect and settle before timing
            self.redis.ping()
        for _ in range(cfg.ping_n):
            t = time.perf_counter()
            self.redis.ping()
            pings.append(time.perf_counter() - t)
        baseline = self.variants[0]
        self.purge(baseline.queue)
        self._send(baseline, "noop")
        message = self.redis.lpop(self.key(baseline.queue))
        if not isinstance(message, bytes):
            raise BenchError("could not read back a Celery message for its size")
        key = self.key("ref-pushpop")
        pairs = []
        start = time.perf_counter()
        for _ in range(cfg.pushpop_n):
            t = time.perf_counter()
            self.redis.lpush(key, message)
            self.redis.brpop([key], timeout=1)
            pairs.append(time.perf_counter() - t)
        elapsed = time.perf_counter() - start
        self.redis.delete(key)
        return {
            "redis_ping_p50_us": stats.percentile(pings, 50) * 1e6,
            "redis_ping_p99_us": stats.percentile(pings, 99) * 1e6,
            "pushpop": {
                "message_bytes": len(message),
                "pairs_per_s": stats.rate(cfg.pushpop_n, elapsed),
                "p50_us": stats.percentile(pairs, 50) * 1e6,
                "n": cfg.pushpop_n,
            },
            "db_commit": self._db_commits(),
        }

    def _db_commits(self) -> dict[str, Any]:
        n = self.config.commit_n
        body = "x" * 100
        times: list[float] = []
        if self.database.engine == "postgresql":
            import psycopg

            assert self.database.url is not None
            table = f"cgb_ref_{self.prefix.replace('-', '_')}"
            with psycopg.connect(self.database.url, autocommit=True) as conn:
                conn.execute(f"CREATE TABLE {table} (id bigserial PRIMARY KEY, body text)")
                try:
                    start = time.perf_counter()
                    for _ in range(n):
                        t = time.perf_counter()
                        conn.execute(f"INSERT INTO {table} (body) VALUES (%s)", (body,))
                        times.append(time.perf_counter() - t)
                    elapsed = time.perf_counter() - start
                    synchronous = conn.execute("SHOW synchronous_commit").fetchone()
                finally:
                    conn.execute(f"DROP TABLE {table}")
            setting = f"synchronous_commit={synchronous[0] if synchronous else '?'}"
        else:
            assert self.database.sqlite_path is not None
            lite = sqlite3.connect(self.database.sqlite_path + ".ref", isolation_level=None)
            try:
                # The example project's SQLite settings.
                lite.execute("PRAGMA journal_mode=WAL")
                lite.execute("PRAGMA synchronous=NORMAL")
                lite.execute("CREATE TABLE ref (id INTEGER PRIMARY KEY, body TEXT)")
                start = time.perf_counter()
                for _ in range(n):
                    t = time.perf_counter()
                    lite.execute("INSERT INTO ref (body) VALUES (?)", (body,))
                    times.append(time.perf_counter() - t)
                elapsed = time.perf_counter() - start
            finally:
                lite.close()
                for suffix in ("", "-wal", "-shm"):
                    path = self.database.sqlite_path + ".ref" + suffix
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
            setting = "journal_mode=WAL, synchronous=NORMAL"
        return {
            "engine": self.database.engine,
            "commits_per_s": stats.rate(n, elapsed),
            "p50_ms": stats.percentile(times, 50) * 1e3,
            "n": n,
            "setting": setting,
        }

    # -- phases ---------------------------------------------------------------------------

    def warm_up(self) -> None:
        """Publish (and, with a worker, run) a few tasks of every variant, then forget them."""
        for variant in self.variants:
            self.purge(variant.queue)
            self._publish(variant, "noop", self.config.warmup)
            if self.worker is not None:
                self.worker.consume(variant.queue)
                self._wait_drained(variant.queue, Counter(), 60)
                self.worker.stop_consuming(variant.queue)
            self.purge(variant.queue)

    def enqueue(self, variant: Variant) -> None:
        """Publish N no-op tasks with no worker on the queue: rate, per-call latency, commands."""
        n = self.config.enqueue_n
        if variant.reset:
            variant.reset()
        self.purge(variant.queue)
        latencies = []
        before = self.commandstats()
        start = time.perf_counter()
        for _ in range(n):
            t = time.perf_counter()
            self._send(variant, "noop")
            latencies.append(time.perf_counter() - t)
        elapsed = time.perf_counter() - start
        after = self.commandstats()
        length = self.queue_len(variant.queue)
        self.purge(variant.queue)
        if length != n:
            raise BenchError(f"{variant.name}: {length} of {n} messages reached {variant.queue!r}")
        per_task = stats.commands_per_task(before, after, n)
        self._record(variant, "enqueue_rate", stats.rate(n, elapsed))
        self._record(variant, "enqueue_p50_us", stats.percentile(latencies, 50) * 1e6)
        self._record(variant, "enqueue_p99_us", stats.percentile(latencies, 99) * 1e6)
        self._record(variant, "commands_enqueue", sum(per_task.values()))
        self.commands[variant.name]["enqueue"] = per_task

    def db_commits(self) -> dict[str, int] | None:
        """Commits the worker processes made so far, by kind (``bench.dbcount``), or None.

        Counted in the workers, not read from ``pg_stat_database``, which reports a busy
        connection's commits late (see ``bench.dbcount``).
        """
        directory = os.environ.get(dbcount.ENV)
        return dbcount.read(directory, exclude=os.getpid()) if directory else None

    def db_activity(self) -> tuple[int, int] | None:
        """Transactions committed and sessions opened so far in the run's PostgreSQL database.

        None on SQLite. Waits first until idle backends have reported their statistics (the
        sessions figure; the commits are counted in the workers, :meth:`db_commits`).
        """
        if self.database.engine != "postgresql":
            return None
        import psycopg

        if self._pg is None:
            assert self.database.url is not None
            self._pg = psycopg.connect(self.database.url, autocommit=True)
        time.sleep(PG_STATS_FLUSH)
        row = self._pg.execute(
            "SELECT xact_commit, sessions FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()
        return int(row[0]), int(row[1])

    def drain(self, variant: Variant, kind: str, n: int, config: WorkerConfig = TUNED) -> None:
        """Fill the queue with N tasks, point the worker at it and time until all are acked."""
        worker = self.workers.get(config.name, self.worker)
        assert worker is not None
        if variant.reset:
            variant.reset()
        self.purge(variant.queue)
        self._publish(variant, kind, n)
        db_before = self.db_activity() if kind == "noop" else None
        commits_before, window_start = self.db_commits(), time.perf_counter()
        own: Counter[str] = Counter()
        before = self.commandstats()
        worker.consume(variant.queue)
        start, remaining = self._wait_started(variant.queue, n, own)
        done = self._wait_drained(variant.queue, own, timeout=60 + n * 0.05)
        after = self.commandstats()
        worker.stop_consuming(variant.queue)
        suffix = config.suffix
        self._record(variant, f"drain_{kind}_rate{suffix}", stats.rate(remaining, done - start))
        if kind == "noop":
            per_task = stats.commands_per_task(before, after, n, own=dict(own))
            self._record(variant, f"commands_execute{suffix}", sum(per_task.values()))
            self.commands[variant.name][f"execute{suffix}"] = per_task
            commits_after, window = self.db_commits(), time.perf_counter() - window_start
            if commits_before is not None and commits_after is not None:
                made = {k: commits_after[k] - commits_before[k] for k in dbcount.KINDS}
                # The tasks' own commits per task; the periodic ones (policy refresh, rollup
                # flush, delivery poller) depend on time, not on the tasks: per second.
                self._record(variant, f"db_commits_execute{suffix}", made["task"] / n)
                periodic = sum(made[k] for k in dbcount.PERIODIC)
                self._record(variant, f"db_periodic_per_s{suffix}", periodic / window)
                self.db_periodic[variant.name][suffix] = {
                    k: made[k] / window for k in dbcount.PERIODIC
                }
            db_after = self.db_activity()
            if db_before is not None and db_after is not None:
                self._record(
                    variant, f"db_sessions_execute{suffix}", (db_after[1] - db_before[1]) / n
                )

    def paced(self, variant: Variant, rate: float, rep: int) -> None:
        """Publish at ``rate`` tasks/s to a consuming worker; latency from call to task start."""
        assert self.worker is not None
        count = max(self.config.paced_min, int(rate * self.config.paced_seconds))
        key = self.key(f"lat-{variant.name}-{rep}")
        if variant.reset:
            variant.reset()
        self.purge(variant.queue)
        self.redis.delete(key)
        self.worker.consume(variant.queue)
        try:
            self._probe(variant, key)
            interval = 1.0 / rate
            # About ten looks a second at the queue: a growing backlog means the worker could
            # not keep up with this rate on this machine, and the tail latency says so.
            every = max(1, int(rate / 10))
            backlog = 0
            start = time.perf_counter()
            for i in range(count):
                delay = start + i * interval - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                self._send(variant, "stamp", key, time.time())
                if i % every == 0:
                    backlog = max(backlog, self.queue_len(variant.queue))
            sent_rate = stats.rate(count, time.perf_counter() - start)
            deadline = time.perf_counter() + 60 + count * 0.05
            while self.redis.llen(key) < count:
                if time.perf_counter() > deadline:
                    got = self.redis.llen(key)
                    raise BenchError(f"{variant.name}: only {got} of {count} paced tasks ran")
                time.sleep(0.05)
            latencies = [float(x) for x in self.redis.lrange(key, 0, -1)]
        finally:
            self.worker.stop_consuming(variant.queue)
            self.redis.delete(key)
        for pct in (50, 95, 99):
            self._record(variant, f"paced_p{pct}_ms", stats.percentile(latencies, pct) * 1e3)
        self._record(variant, "paced_backlog_max", backlog)
        self._record(variant, "paced_sent_rate", sent_rate)
        self._record(variant, "paced_count", count)

    def _probe(self, variant: Variant, key: str) -> None:
        """Run one task through the queue just added, so the consumer is live before timing."""
        assert self.redis.llen(key) == 0
        self._send(variant, "stamp", key, time.time())
        deadline = time.perf_counter() + 30
        while not self.redis.llen(key):
            if time.perf_counter() > deadline:
                raise BenchError(f"{variant.name}: the probe task did not run in 30s")
            time.sleep(0.005)
        self.redis.delete(key)

    # -- the whole run --------------------------------------------------------------------

    def interleaved(self, name: str, step: Callable[[Variant, int], None]) -> None:
        """Run ``step`` for every variant, A B A B ..., ``reps`` times."""
        for rep in range(self.config.reps):
            for variant in self.variants:
                self.log(f"{name}: {variant.name} (repetition {rep + 1}/{self.config.reps})")
                step(variant, rep)

    def run(self, start_worker: Callable[[WorkerConfig], BenchWorker]) -> dict[str, Any]:
        """Run every phase; return the references, per-run figures and command breakdowns."""
        cfg = self.config
        self.log("references: Redis round trip, push/pop, database commits")
        references = self.references()
        self.warm_up()
        self.interleaved("enqueue", lambda v, rep: self.enqueue(v))
        for config in CONFIGS:
            self.log(f"starting the {config.title} worker (prefork, 2 processes)")
            self.worker = self.workers[config.name] = start_worker(config)
            self.warm_up()
        for kind, label, n in (
            ("noop", "drain no-op", cfg.drain_noop_n),
            ("sleep", "drain 10 ms", cfg.drain_sleep_n),
        ):
            for rep in range(cfg.reps):
                for config in CONFIGS:
                    for variant in self.variants:
                        self.log(
                            f"{label}, {config.title}: {variant.name} "
                            f"(repetition {rep + 1}/{cfg.reps})"
                        )
                        self.drain(variant, kind, n, config)
        self.worker = self.workers[TUNED.name]
        plain = stats.summarize(self.per_run[self.variants[0].name]["drain_noop_rate"])["median"]
        paced_rate = max(1.0, plain / 2)
        self.interleaved("paced", lambda v, rep: self.paced(v, paced_rate, rep))
        variants = {}
        for variant in self.variants:
            metrics = {k: stats.summarize(v) for k, v in self.per_run[variant.name].items()}
            variants[variant.name] = {
                "title": variant.title,
                "description": variant.description,
                "baseline": variant.baseline,
                "queue": variant.queue,
                "targets": dict(variant.targets),
                "reference": variant.reference,
                "reference_targets": dict(variant.reference_targets),
                "metrics": metrics,
                "commands_last_run": self.commands[variant.name],
                "db_periodic_last_run": self.db_periodic[variant.name],
            }
        if self._pg is not None:
            self._pg.close()
        return {
            "config": asdict(cfg),
            "configs": {
                c.name: {"title": c.title, "suffix": c.suffix, "env": c.env} for c in CONFIGS
            },
            "paced_rate": paced_rate,
            "references": references,
            "variants": variants,
        }


def progress(message: str) -> None:
    """Print a progress line on stderr (stdout carries the table)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
