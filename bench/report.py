"""Render a results dict (as written to ``bench/results/*.json``) as Markdown; pure functions."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bench import delivery, observability, runs, stats

DOCS_START = "<!-- bench-results:start -->"
DOCS_END = "<!-- bench-results:end -->"


@dataclass(frozen=True)
class Figure:
    """One row of a comparison table.

    Attributes:
        key: Metric key in the results.
        label: Row label.
        unit: Unit shown after the label.
        higher_is_better: For the reader; ratios are always guarded / plain.
        compare: ``"ratio"`` (guarded / plain) or ``"extra"`` (guarded - plain).
        target: Key of the variant's target for this row, if any.
        digits: Decimals of the figures.
    """

    key: str
    label: str
    unit: str
    higher_is_better: bool
    compare: str = "ratio"
    target: str | None = None
    digits: int = 0


FIGURES: tuple[Figure, ...] = (
    Figure("enqueue_rate", "enqueue throughput", "tasks/s", True, target="enqueue_rate"),
    Figure("enqueue_p50_us", "enqueue latency p50", "µs", False),
    Figure("enqueue_p99_us", "enqueue latency p99", "µs", False),
    Figure("drain_noop_rate", "drain, no-op task", "tasks/s", True, target="drain_noop_rate"),
    Figure("drain_sleep_rate", "drain, 10 ms task", "tasks/s", True, target="drain_sleep_rate"),
    Figure(
        "drain_noop_rate_qs",
        "drain, no-op task, quick start",
        "tasks/s",
        True,
        target="drain_noop_rate",
    ),
    Figure(
        "drain_sleep_rate_qs",
        "drain, 10 ms task, quick start",
        "tasks/s",
        True,
        target="drain_sleep_rate",
    ),
    Figure("paced_p50_ms", "paced latency p50", "ms", False, digits=1),
    Figure("paced_p95_ms", "paced latency p95", "ms", False, digits=1),
    Figure("paced_p99_ms", "paced latency p99", "ms", False, digits=1),
    Figure("paced_backlog_max", "paced: largest backlog", "tasks", False),
    Figure(
        "commands_enqueue",
        "Redis commands per task, enqueue",
        "",
        False,
        compare="extra",
        target="extra_commands_enqueue",
        digits=2,
    ),
    Figure(
        "commands_execute",
        "Redis commands per task, execute",
        "",
        False,
        compare="extra",
        target="extra_commands_execute",
        digits=2,
    ),
    Figure(
        "commands_execute_qs",
        "Redis commands per task, execute, quick start",
        "",
        False,
        compare="extra",
        target="extra_commands_execute",
        digits=2,
    ),
    Figure(
        "db_commits_execute",
        "database commits per task, execute",
        "",
        False,
        compare="extra",
        target="extra_db_commits_execute",
        digits=2,
    ),
    Figure(
        "db_commits_execute_qs",
        "database commits per task, execute, quick start",
        "",
        False,
        compare="extra",
        target="extra_db_commits_execute",
        digits=2,
    ),
    Figure(
        "db_periodic_per_s",
        "periodic database commits, execute",
        "per s",
        False,
        compare="extra",
        digits=2,
    ),
    Figure(
        "db_periodic_per_s_qs",
        "periodic database commits, execute, quick start",
        "per s",
        False,
        compare="extra",
        digits=2,
    ),
    Figure(
        "db_sessions_execute_qs",
        "database connections opened per task, execute, quick start",
        "",
        False,
        compare="extra",
        digits=2,
    ),
)


@dataclass(frozen=True)
class Target:
    """One target of issue 12: a figure of one variant against plain Celery, per configuration.

    Attributes:
        label: Row label.
        variant: The guarded variant.
        key: Metric key (the tuned configuration's; the quick start's adds ``_qs``).
        bound: The target: a minimum ratio, or a maximum extra per task.
        compare: ``"ratio"`` or ``"extra"``.
        per_config: Measured per worker configuration (the drains); enqueue is not.
        digits: Decimals of an ``"extra"`` figure.
    """

    label: str
    variant: str
    key: str
    bound: float
    compare: str = "ratio"
    per_config: bool = True
    digits: int = 2


#: The targets of issue 12 (ratios to plain Celery in the same run). Reported, never asserted.
ISSUE_TARGETS: tuple[Target, ...] = (
    Target("no-op drain, routing only", "guarded-routing", "drain_noop_rate", 0.90),
    Target("no-op drain, key on the Redis ledger", "guarded-idem-redis", "drain_noop_rate", 0.85),
    Target("10 ms drain, routing only", "guarded-routing", "drain_sleep_rate", 0.97),
    Target("10 ms drain, key on the Redis ledger", "guarded-idem-redis", "drain_sleep_rate", 0.97),
    Target("enqueue, routing only", "guarded-routing", "enqueue_rate", 0.95, per_config=False),
    Target(
        "enqueue, key on the Redis ledger",
        "guarded-idem-redis",
        "enqueue_rate",
        0.75,
        per_config=False,
    ),
    Target("no-op drain, key on the database ledger", "guarded-idem-db", "drain_noop_rate", 0.50),
    Target(
        "database commits per task, key on the database ledger (no-op drain)",
        "guarded-idem-db",
        "db_commits_execute",
        float("inf"),
        compare="extra",
    ),
    Target(
        "extra database commits per guarded run, routing only",
        "guarded-routing",
        "db_commits_execute",
        0,
        compare="extra",
    ),
    Target(
        "extra database connections per guarded run, routing only",
        "guarded-routing",
        "db_sessions_execute",
        0,
        compare="extra",
    ),
    Target(
        "extra Redis commands per guarded run, routing only",
        "guarded-routing",
        "commands_execute",
        1,
        compare="extra",
    ),
)


def _median(variant: Mapping[str, Any] | None, key: str) -> float | None:
    figure = (variant or {}).get("metrics", {}).get(key) or {}
    value: float | None = figure.get("median")
    return value


def _target_cell(target: Target, results: Mapping[str, Any], suffix: str) -> str:
    variants = results.get("variants", {})
    guarded = variants.get(target.variant)
    if guarded is None:
        return "not run"
    baseline = next(v for v in variants.values() if v["baseline"])
    key = target.key + (suffix if target.per_config else "")
    mine, theirs = _median(guarded, key), _median(baseline, key)
    if target.compare == "ratio":
        value = stats.ratio(mine, theirs)
        if value is None:
            return "—"
        return f"{value:.2f}x {'met' if value >= target.bound else 'missed'}"
    if mine is None or theirs is None:
        return "—"
    if target.bound == float("inf"):  # reported only
        return f"{mine:.{target.digits}f} (plain {theirs:.{target.digits}f})"
    extra = mine - theirs
    return f"{extra:+.{target.digits}f} {'met' if extra <= target.bound + 0.005 else 'missed'}"


def targets_table(results: Mapping[str, Any]) -> str:
    """Every target of issue 12 with met/missed, per worker configuration, side by side."""
    configs = results.get("configs") or {"tuned": {"title": "tuned", "suffix": ""}}
    order = sorted(configs.values(), key=lambda c: c["suffix"] == "")  # quick start first
    lines = [
        "| target | bound | " + " | ".join(c["title"] for c in order) + " |",
        "|---|---|" + "---:|" * len(order),
    ]
    for target in ISSUE_TARGETS:
        if target.compare == "ratio":
            bound = f"≥ {target.bound:.2f}x"
        elif target.bound == float("inf"):
            bound = "reported"
        else:
            bound = f"≤ {target.bound:g} extra"
        cells = [_target_cell(target, results, c["suffix"]) for c in order]
        if target.key == "drain_noop_rate" and target.variant == "guarded-idem-db":
            title = (results.get("variants", {}).get(target.variant) or {}).get("title", "")
            if "PostgreSQL" not in title:
                cells = ["not measured (PostgreSQL only)"] * len(order)
        lines.append(f"| {target.label} | {bound} | " + " | ".join(cells) + " |")
    replay = (results.get("dlq") or {}).get("replay")
    if replay:
        ratio = stats.ratio(replay["rows_per_s"], plain_enqueue_rate(results))
        shown = "—" if ratio is None else f"{ratio:.2f}x {'met' if ratio >= 0.95 else 'missed'}"
        lines.append(
            "| bulk replay vs plain Celery enqueue | ≥ 0.95x | "
            + " | ".join([shown] * len(order))
            + " |"
        )
    return "\n".join(lines)


def fmt(value: float | None, digits: int = 0) -> str:
    """Format a figure with thousands separators; an em dash when missing."""
    if value is None:
        return "—"
    return f"{value:,.{digits}f}"


def cell(summary: Mapping[str, Any] | None, digits: int) -> str:
    """Median with its min..max spread over the repetitions."""
    if not summary or summary.get("median") is None:
        return "—"
    median = fmt(summary["median"], digits)
    if summary.get("n", 0) < 2:
        return median
    return f"{median} ({fmt(summary['min'], digits)}..{fmt(summary['max'], digits)})"


def judge(figure: Figure, value: float | None, target: float | None) -> str:
    """Show the target next to the comparison, with whether this run met it (never asserted)."""
    if target is None:
        return ""
    if figure.compare == "ratio":
        text = f"≥ {target:g}x"
        met = value is not None and value >= target
    else:
        text = f"≤ {target:g}"
        met = value is not None and value <= target
    if value is None:
        return text
    return f"{text} {'met' if met else 'missed'}"


def comparison(figure: Figure, value: float | None, baseline: float | None) -> float | None:
    """guarded / plain for ratios, guarded - plain for command counts."""
    if figure.compare == "ratio":
        return stats.ratio(value, baseline)
    if value is None or baseline is None:
        return None
    return value - baseline


def variant_table(results: Mapping[str, Any], name: str) -> str:
    """The table of one guarded variant against the baseline."""
    variants = results["variants"]
    baseline_name = next(n for n, v in variants.items() if v["baseline"])
    plain = variants[baseline_name]["metrics"]
    guarded = variants[name]
    targets = guarded.get("targets", {})
    lines = [
        f"| figure | {variants[baseline_name]['title']} | {guarded['title']} "
        "| guarded/plain | target |",
        "|---|---:|---:|---:|---|",
    ]
    for figure in FIGURES:
        mine = guarded["metrics"].get(figure.key)
        theirs = plain.get(figure.key)
        value = comparison(
            figure,
            mine.get("median") if mine else None,
            theirs.get("median") if theirs else None,
        )
        if figure.compare == "ratio":
            shown = "—" if value is None else f"{value:.2f}x"
        else:
            shown = "—" if value is None else f"{value:+.2f} extra"
        label = f"{figure.label} ({figure.unit})" if figure.unit else figure.label
        if figure.key.startswith("paced_"):
            label += f" at {fmt(results.get('paced_rate'))}/s"
        target = targets.get(figure.target) if figure.target else None
        lines.append(
            f"| {label} | {cell(theirs, figure.digits)} | {cell(mine, figure.digits)} "
            f"| {shown} | {judge(figure, value, target)} |"
        )
    lines += reference_rows(results, name)
    return "\n".join(lines)


#: The drains a variant with a ``reference`` is also compared with it on.
REFERENCE_FIGURES = tuple(f for f in FIGURES if f.key.startswith("drain_"))


def reference_rows(results: Mapping[str, Any], name: str) -> list[str]:
    """Rows of ``name``'s drains against its reference variant (same columns, "vs" it)."""
    variants = results["variants"]
    guarded = variants[name]
    reference = variants.get(guarded.get("reference") or "")
    if reference is None:
        return []
    targets = guarded.get("reference_targets", {})
    lines = []
    for figure in REFERENCE_FIGURES:
        mine = guarded["metrics"].get(figure.key)
        theirs = reference["metrics"].get(figure.key)
        value = comparison(
            figure,
            mine.get("median") if mine else None,
            theirs.get("median") if theirs else None,
        )
        shown = "—" if value is None else f"{value:.2f}x vs {reference['title']}"
        target = targets.get(figure.target) if figure.target else None
        lines.append(
            f"| {figure.label} ({figure.unit}), vs {reference['title']} "
            f"| {cell(theirs, figure.digits)} ({reference['title']}) "
            f"| {cell(mine, figure.digits)} | {shown} | {judge(figure, value, target)} |"
        )
    return lines


#: Issue 16's bound on the Redis round trips per task of a limit that never binds (one
#: concurrency and one rate limit).
ROUND_TRIPS_TARGET = 2


def limits_table(results: Mapping[str, Any]) -> str:
    """Issue 16's targets: each limits variant against the same task without the limit.

    The drain ratios per worker configuration (from the drains), and the round trips per
    task that :mod:`bench.limit_trips` counted in process (the same for both configurations).
    """
    variants = results.get("variants", {})
    configs = results.get("configs") or {"tuned": {"title": "tuned", "suffix": ""}}
    order = sorted(configs.values(), key=lambda c: c["suffix"] == "")  # quick start first
    lines = [
        "| target | bound | " + " | ".join(c["title"] for c in order) + " |",
        "|---|---|" + "---:|" * len(order),
    ]
    for variant in variants.values():
        reference = variants.get(variant.get("reference") or "")
        if reference is None:
            continue
        for key, bound in variant.get("reference_targets", {}).items():
            figure = next(f for f in FIGURES if f.key == key)
            cells = []
            for config in order:
                ratio = stats.ratio(
                    _median(variant, key + config["suffix"]),
                    _median(reference, key + config["suffix"]),
                )
                cells.append(
                    "—"
                    if ratio is None
                    else f"{ratio:.2f}x {'met' if ratio >= bound else 'missed'}"
                )
            lines.append(
                f"| {figure.label}: {variant['title']} / {reference['title']} "
                f"| ≥ {bound:.2f}x | " + " | ".join(cells) + " |"
            )
    for name, trips in (results.get("limit_trips") or {}).items():
        title = variants.get(name, {}).get("title", name)
        per_task = trips["per_task"]
        shown = f"{per_task:.2f} (admit {trips['admit']:.2f} + release {trips['release']:.2f})"
        if trips["store"] == "Redis":
            label, bound = "Redis round trips per task", f"≤ {ROUND_TRIPS_TARGET}"
            shown += " met" if per_task <= ROUND_TRIPS_TARGET + 0.005 else " missed"
        else:
            label, bound = f"database {trips['unit']} per task ({trips['store']})", "reported"
        rules = "; ".join(
            f"{r['scope']}: concurrency {r['concurrency']}, rate {r['rate']}"
            for r in trips["rules"]
        )
        lines.append(
            f"| {label}: {title} [{rules}] | {bound} | " + " | ".join([shown] * len(order)) + " |"
        )
    return "\n".join(lines) if len(lines) > 2 else ""


def _commands(per_task: Mapping[str, float], floor: float = 0.1) -> str:
    shown = [f"{name} {calls:.2f}" for name, calls in per_task.items() if abs(calls) >= floor]
    return ", ".join(shown) or "none"


def command_lines(results: Mapping[str, Any], name: str) -> list[str]:
    """Which Redis commands a task costs per phase, and which ones the guard adds.

    From the last repetition; commands under 0.1 per task (the worker's idle polling, control
    messages) are left out.
    """
    variants = results["variants"]
    baseline = next(v for v in variants.values() if v["baseline"])
    plain = baseline.get("commands_last_run", {})
    guarded = variants[name].get("commands_last_run", {})
    lines = []
    for phase in ("enqueue", "execute"):
        theirs, mine = plain.get(phase, {}), guarded.get(phase, {})
        extra = {
            cmd: mine.get(cmd, 0.0) - theirs.get(cmd, 0.0)
            for cmd in sorted(set(mine) | set(theirs))
        }
        lines.append(
            f"- Redis commands per task, {phase}: plain {_commands(theirs)}; "
            f"extra with the guard: {_commands(extra)}"
        )
    theirs, mine = (
        baseline.get("db_periodic_last_run", {}),
        variants[name].get("db_periodic_last_run", {}),
    )
    if mine.get(""):
        lines.append(
            "- periodic database commits per second, execute (tuned worker): plain "
            f"{_commands(theirs.get('', {}), 0.01)}; with the guard "
            f"{_commands(mine[''], 0.01)}. They depend on time, not on the tasks: "
            "the delivery poller (every poll), the task-policy refresh (every "
            "`CELERY_GUARD_POLICY_REFRESH` in each process that runs a guarded task) and the "
            "rollup flush (every `CELERY_GUARD_ROLLUP_FLUSH_SECONDS`), over a drain of a "
            "second or two; the per-task figure counts every other commit"
        )
    return lines


def fingerprint_table(results: Mapping[str, Any]) -> str:
    """Machine, versions, services and the reference figures of the run (when it measured them)."""
    fp = results["fingerprint"]
    config = results["config"]
    duration = f"{results.get('duration_s', 0):.0f} s"
    if results.get("variants"):
        mode = f"{config['mode']} ({config['reps']} repetitions, {duration})"
    else:
        mode = f"{config['mode']}, dead letters only ({duration})"
    rows = [
        ("mode", mode),
        ("started", results.get("started_at", "")),
        ("CPU", f"{fp['cpu_model']}, {fp['cores']} cores"),
        ("load average (start → end)", f"{fp['load_start']} → {fp.get('load_end', '?')}"),
        ("Python", fp["python"]),
        ("packages", ", ".join(f"{k} {v}" for k, v in fp["packages"].items())),
        ("Redis", f"{fp['redis_version']} — {results['services']['redis']}"),
        ("database", f"{fp['database_version']} — {results['services']['database']}"),
    ]
    refs = results.get("references")
    if refs:
        push = refs["pushpop"]
        db = refs["db_commit"]
        rows += [
            ("Redis round trip (PING p50)", f"{refs['redis_ping_p50_us']:.0f} µs"),
            (
                "raw Redis LPUSH+BRPOP",
                f"{fmt(push['pairs_per_s'])} pairs/s (p50 {push['p50_us']:.0f} µs, "
                f"{push['message_bytes']} B message, as Celery's)",
            ),
            (
                f"raw {db['engine']} single-row insert+commit",
                f"{fmt(db['commits_per_s'])} commits/s (p50 {db['p50_ms']:.2f} ms, "
                f"{db['setting']})",
            ),
        ]
    lines = ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]
    return "\n".join(lines)


def busy_note(fingerprint: Mapping[str, Any]) -> str | None:
    """A warning when the 1-minute load average was above half the cores at start or end."""
    cores = fingerprint.get("cores") or 1
    loads = []
    for key in ("load_start", "load_end"):
        try:
            loads.append(float(str(fingerprint.get(key, "")).split("/")[0]))
        except ValueError:
            continue
    if not loads or max(loads) <= cores / 2:
        return None
    return (
        f"The machine was busy (1-minute load average up to {max(loads):.1f} on {cores} "
        "cores): other work competed for the CPU, so the timings are noisy. Compare the "
        "min..max ranges before reading a ratio; the command counts are not affected."
    )


def _latency(figure: Mapping[str, Any]) -> str:
    return f"{figure['p50_us']:,.0f} / {figure['p99_us']:,.0f}"


def micro_tables(micro: Mapping[str, Any]) -> str:
    """Ledger decision latencies per backend and beat lease figures per database."""
    names = {"postgresql": "PostgreSQL", "sqlite": "SQLite"}
    ledger_rows = []
    lease_rows = []
    for engine, figures in micro.items():
        name = names.get(engine, engine)
        backends = [(f"database ({name})", figures["ledger"])]
        if "redis_ledger" in figures:
            backends.append(("Redis", figures["redis_ledger"]))
        for label, ledger in backends:
            ledger_rows.append(
                f"| {label} | {_latency(ledger['first_claim'])} | {_latency(ledger['duplicate'])} "
                f"| {ledger['duplicate']['n']} |"
            )
        lease = figures["lease"]
        lease_rows.append(
            f"| {name} | {_latency(lease['acquire'])} | {_latency(lease['renew'])} "
            f"| {_latency(lease['tick_step'])} | {lease['renew_every_s']:g} s "
            f"| {lease['loop_share_p50'] * 100:.3f}% / {lease['loop_share_p99'] * 100:.3f}% "
            "| < 1% |"
        )
    ledger_rows.sort(key=lambda row: row.startswith("| Redis"))
    return "\n".join(
        [
            "| ledger | first claim p50 / p99 (µs) | duplicate decision p50 / p99 (µs) | n |",
            "|---|---:|---:|---:|",
            *ledger_rows,
            "",
            "| beat lease on | acquire p50 / p99 (µs) | renew p50 / p99 (µs) "
            "| tick's lease step p50 / p99 (µs) | renewed every | share of the beat loop "
            "p50 / p99 | target |",
            "|---|---:|---:|---:|---:|---:|---|",
            *lease_rows,
        ]
    )


#: Targets of issue 5, reported, never asserted.
DLQ_P95_TARGET_MS = 300.0
DLQ_TARGET_ROWS = 1_000_000
DLQ_REPLAY_TARGET = 1000.0


def plain_enqueue_rate(results: Mapping[str, Any]) -> float | None:
    """The baseline's median enqueue throughput of the run, or None (a dead-letter-only run)."""
    for variant in results.get("variants", {}).values():
        if variant["baseline"]:
            median: float | None = variant["metrics"].get("enqueue_rate", {}).get("median")
            return median
    return None


def dlq_tables(dlq: Mapping[str, Any], plain_enqueue: float | None = None) -> str:
    """Changelist p50 / p95 and SQL queries per request kind and table size; bulk replay.

    ``plain_enqueue`` is plain Celery's enqueue throughput in the same run: the bound of a
    replay that publishes one message per row, shown as the replay's ratio to it.
    """
    parts = []
    steps = dlq.get("changelist") or []
    if steps:
        at_target = next((s for s in steps if s["rows"] >= DLQ_TARGET_ROWS), None)
        header = "| request | " + " | ".join(
            f"{fmt(step['rows'])} rows: p50 / p95 (ms), queries" for step in steps
        )
        lines = [
            f"{header} | target: p95 < {DLQ_P95_TARGET_MS:g} ms at {fmt(DLQ_TARGET_ROWS)} rows |",
            "|---|" + "---:|" * len(steps) + "---|",
        ]
        for label in steps[0]["requests"]:
            cells = []
            for step in steps:
                figure = step["requests"].get(label)
                cells.append(
                    "—"
                    if figure is None
                    else f"{figure['p50_ms']:,.0f} / {figure['p95_ms']:,.0f}, {figure['queries']}"
                )
            if at_target is None:
                verdict = "not measured (FULL=1)"
            else:
                p95 = at_target["requests"].get(label, {}).get("p95_ms")
                verdict = "—" if p95 is None else "met" if p95 < DLQ_P95_TARGET_MS else "missed"
            lines.append(f"| {label} | {' | '.join(cells)} | {verdict} |")
        seeded = ", ".join(f"{fmt(s['rows'])} rows in {s['seed_s']:.0f} s" for s in steps)
        parts += ["\n".join(lines), "", f"Seeded with `bench.seed.seed`: {seeded}."]
    elif dlq.get("changelist_note"):
        parts.append(f"> {dlq['changelist_note']}")
    replay = dlq.get("replay")
    if replay:
        rate = replay["rows_per_s"]
        met = "met" if rate >= DLQ_REPLAY_TARGET else "missed"
        ratio = stats.ratio(rate, plain_enqueue)
        shown = "—" if ratio is None else f"{ratio:.2f}x"
        parts += [
            "",
            "| bulk replay (no rate limit) | dead letters | replayed | published | seconds "
            "| rows/s | vs plain enqueue | target |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
            f"| `celery_guard.dlq.replay.replay` | {fmt(replay['rows'])} "
            f"| {fmt(replay['replayed'])} | {fmt(replay['published'])} "
            f"| {replay['seconds']:.1f} | {fmt(rate)} | {shown} "
            f"| ≥ {DLQ_REPLAY_TARGET:,.0f} rows/s {met} |",
        ]
    return "\n".join(parts).strip("\n")


def render(results: Mapping[str, Any]) -> str:
    """The whole Markdown report of one run."""
    heading = "### Machine and references" if results.get("references") else "### Machine"
    parts = [heading, "", fingerprint_table(results)]
    busy = busy_note(results["fingerprint"])
    notes = [*results.get("notes", []), *([busy] if busy else [])]
    for note in notes:
        parts += ["", f"> {note}"]
    if results.get("variants"):
        parts += [
            "",
            "### Targets of issue 12 (guarded / plain Celery, same run)",
            "",
            targets_table(results),
            "",
            "Quick start: a project that sets nothing beyond the README's quick start (no "
            "`CELERY_DB_REUSE_MAX`); tuned: `CELERY_DB_REUSE_MAX` set by the project. Each has "
            "a worker of its own; the enqueue figures need no worker and are the same for both.",
        ]
    for name, variant in results.get("variants", {}).items():
        if variant["baseline"]:
            continue
        parts += ["", f"### {variant['title']} vs plain Celery", "", variant_table(results, name)]
        parts += ["", *command_lines(results, name)]
    limits = limits_table(results)
    if limits:
        parts += [
            "",
            "### Targets of issue 16 (a limit that never binds / the same task without it)",
            "",
            limits,
            "",
            "Round trips counted on the client side, in process, for what the limits step "
            "sends the store per task (one admission, one release): see *Limits: round trips "
            "per task* in docs/benchmarks.md.",
        ]
    if results.get("micro"):
        parts += [
            "",
            "### Idempotency decisions and the beat lease (micro-benchmarks)",
            "",
            micro_tables(results["micro"]),
        ]
    if results.get("observability"):
        parts += [
            "",
            "### Observability: the events' cost per task (in process)",
            "",
            observability.table(results["observability"], observability.worker_noop_us(results)),
        ]
    if results.get("dlq"):
        parts += [
            "",
            "### Dead letters: admin changelist and bulk replay",
            "",
            dlq_tables(results["dlq"], plain_enqueue_rate(results)),
        ]
    if results.get("delivery"):
        parts += [
            "",
            "### Delivery: the outbox, the schedule, the idle poller",
            "",
            delivery.table(results["delivery"]),
        ]
    if results.get("runs"):
        parts += [
            "",
            "### Bulk runs: start, drain against a group, memory",
            "",
            runs.table(results["runs"]),
        ]
    footer = "Targets are reported, never asserted."
    if results.get("variants"):
        footer = (
            "Medians over the repetitions, (min..max) in brackets. Ratios above 1 mean the "
            f"guarded side is faster for throughputs and slower for latencies. {footer}"
        )
    parts += ["", footer]
    return "\n".join(parts) + "\n"


def replace_between_markers(document: str, content: str) -> str:
    """Put ``content`` between the results markers of ``document``.

    Raises:
        ValueError: The markers are missing or out of order.
    """
    pattern = re.compile(re.escape(DOCS_START) + r".*?" + re.escape(DOCS_END), re.DOTALL)
    if not pattern.search(document):
        raise ValueError(f"the document has no {DOCS_START} ... {DOCS_END} section")
    block = f"{DOCS_START}\n{content.rstrip()}\n{DOCS_END}"
    return pattern.sub(lambda _: block, document, count=1)
