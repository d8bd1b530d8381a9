"""The benchmark harness's pure parts: statistics, the case registry and report rendering.

No timing here: `make bench` measures, the suite only checks the arithmetic and the rendering.
"""

from __future__ import annotations

import copy

import pytest

from bench import cases, report, stats
from bench.__main__ import parse_args


def test_percentile_interpolates_between_ranks():
    assert stats.percentile([1, 2, 3, 4], 50) == 2.5
    assert stats.percentile([4, 1, 3, 2], 0) == 1
    assert stats.percentile([4, 1, 3, 2], 100) == 4
    assert stats.percentile(list(range(101)), 99) == 99
    assert stats.percentile([7.0], 99) == 7.0


@pytest.mark.parametrize("values, pct", [([], 50), ([1.0], -1), ([1.0], 101)])
def test_percentile_rejects_bad_input(values, pct):
    with pytest.raises(ValueError):
        stats.percentile(values, pct)


def test_summarize_gives_median_spread_and_runs():
    summary = stats.summarize([3, 1, 2, 10])
    assert summary["median"] == 2.5
    assert (summary["min"], summary["max"], summary["n"]) == (1, 10, 4)
    assert summary["q1"] == 1.75
    assert summary["q3"] == 4.75
    assert summary["runs"] == [3.0, 1.0, 2.0, 10.0]
    assert stats.summarize([])["median"] is None


def test_ratio_and_rate_handle_missing_and_zero():
    assert stats.ratio(90, 100) == 0.9
    assert stats.ratio(None, 100) is None
    assert stats.ratio(1, 0) is None
    assert stats.rate(50, 0.5) == 100
    assert stats.rate(50, 0) == 0


def test_commands_per_task_subtracts_the_harness_own_calls():
    before = {"lpush": 10, "llen": 5, "brpop": 2}
    after = {"lpush": 110, "llen": 25, "brpop": 102, "hset": 100}
    per_task = stats.commands_per_task(before, after, 100, own={"llen": 20})
    assert per_task == {"lpush": 1.0, "brpop": 1.0, "hset": 1.0}


def test_parse_commandstats_reads_redis_py_info():
    info = {
        "cmdstat_lpush": {"calls": 7, "usec": 3},
        "cmdstat_client|setinfo": {"calls": 2},
        "errorstat_ERR": {"count": 1},
    }
    assert stats.parse_commandstats(info) == {"lpush": 7, "client|setinfo": 2}


def test_variant_needs_every_task_kind():
    with pytest.raises(ValueError, match="lacks task kinds"):
        cases.Variant(name="x", title="x", tasks={"noop": object()}, queue="q")


def test_registry_has_one_baseline_first(monkeypatch):
    monkeypatch.setattr(cases, "_registry", {})
    tasks = dict.fromkeys(cases.KINDS, object())
    with pytest.raises(LookupError, match="no baseline"):
        cases.variants()
    cases.register(cases.Variant(name="g", title="g", tasks=tasks, queue="q"))
    cases.register(cases.Variant(name="p", title="p", tasks=tasks, queue="q", baseline=True))
    with pytest.raises(ValueError, match="already a baseline"):
        cases.register(cases.Variant(name="p2", title="p", tasks=tasks, queue="q", baseline=True))
    assert [v.name for v in cases.variants()] == ["p", "g"]
    assert [v.name for v in cases.variants(["g"])] == ["p", "g"]
    with pytest.raises(LookupError, match="unknown bench variants"):
        cases.variants(["nope"])


def _summary(*runs: float) -> dict:
    return stats.summarize(runs)


RESULTS = {
    "schema": 1,
    "started_at": "2026-01-01T00:00:00+00:00",
    "duration_s": 100.0,
    "config": {"mode": "quick", "reps": 3},
    "paced_rate": 250.0,
    "fingerprint": {
        "cores": 2,
        "cpu_model": "Test CPU",
        "python": "CPython 3.11.7",
        "packages": {"celery": "5.7.0"},
        "redis_version": "Redis 7.0",
        "database_version": "PostgreSQL 15",
        "load_start": "0.10/0.10/0.10",
        "load_end": "0.20/0.10/0.10",
    },
    "services": {"redis": "started by the harness", "database": "started by the harness"},
    "notes": ["a note"],
    "references": {
        "redis_ping_p50_us": 100.0,
        "pushpop": {"message_bytes": 944, "pairs_per_s": 3000.0, "p50_us": 300.0},
        "db_commit": {
            "engine": "postgresql",
            "commits_per_s": 2000.0,
            "p50_ms": 0.5,
            "setting": "synchronous_commit=on",
        },
    },
    "variants": {
        "plain": {
            "title": "plain Celery",
            "baseline": True,
            "targets": {},
            "commands_last_run": {
                "enqueue": {"lpush": 1.0},
                "execute": {"brpop": 1.0, "llen": 0.01},
            },
            "metrics": {
                "enqueue_rate": _summary(1000, 1100, 900),
                "drain_noop_rate": _summary(500, 500, 500),
                "commands_enqueue": _summary(1, 1, 1),
                "commands_execute": _summary(9, 9, 9),
            },
        },
        "guarded": {
            "title": "guarded: routing only",
            "baseline": False,
            "targets": {"enqueue_rate": 0.75, "drain_noop_rate": 0.85, "extra_commands_execute": 2},
            "commands_last_run": {"enqueue": {"lpush": 1.0}, "execute": {"brpop": 1.0, "get": 3.0}},
            "metrics": {
                "enqueue_rate": _summary(700, 700, 700),
                "drain_noop_rate": _summary(400, 400, 400),
                "commands_enqueue": _summary(1, 1, 1),
                "commands_execute": _summary(12, 12, 12),
            },
        },
    },
}


def test_report_shows_ratios_spread_and_targets():
    text = report.render(RESULTS)
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines()}
    enqueue = rows["enqueue throughput (tasks/s)"]
    assert "1,000 (900..1,100)" in enqueue
    assert "0.70x" in enqueue
    assert "≥ 0.75x missed" in enqueue
    assert "0.80x" in rows["drain, no-op task (tasks/s)"]
    assert "≥ 0.85x missed" in rows["drain, no-op task (tasks/s)"]
    assert "+3.00 extra" in rows["Redis commands per task, execute"]
    assert "≤ 2 missed" in rows["Redis commands per task, execute"]
    assert "+0.00 extra" in rows["Redis commands per task, enqueue"]
    assert "—" in rows["drain, 10 ms task (tasks/s)"]  # not measured: shown, not invented
    assert "paced latency p50 (ms) at 250/s" in rows
    assert "> a note" in text
    assert "Test CPU, 2 cores" in text
    assert "machine was busy" not in text
    assert "enqueue: plain lpush 1.00; extra with the guard: none" in text
    assert "execute: plain brpop 1.00; extra with the guard: get 3.00" in text


def test_report_marks_targets_met():
    results = copy.deepcopy(RESULTS)
    results["variants"]["guarded"]["metrics"]["enqueue_rate"] = _summary(990)
    row = next(line for line in report.render(results).splitlines() if "enqueue throughput" in line)
    assert "0.99x" in row
    assert "≥ 0.75x met" in row
    assert "990 |" in row  # a single run has no spread


def test_report_warns_when_the_machine_was_busy():
    results = copy.deepcopy(RESULTS)
    results["fingerprint"]["load_end"] = "3.50/1.00/0.50"
    assert "load average up to 3.5 on 2 cores" in report.render(results)


def test_results_section_is_replaced_between_markers_only():
    doc = f"intro\n{report.DOCS_START}\nold\n{report.DOCS_END}\noutro\n"
    new = report.replace_between_markers(doc, "| new |\n")
    assert new == f"intro\n{report.DOCS_START}\n| new |\n{report.DOCS_END}\noutro\n"
    assert report.replace_between_markers(new, "again").count(report.DOCS_START) == 1
    with pytest.raises(ValueError):
        report.replace_between_markers("no markers", "x")


def test_registry_orders_guarded_variants(monkeypatch):
    monkeypatch.setattr(cases, "_registry", {})
    tasks = dict.fromkeys(cases.KINDS, object())
    cases.register(cases.Variant(name="late", title="l", tasks=tasks, queue="q", order=30))
    cases.register(cases.Variant(name="p", title="p", tasks=tasks, queue="q", baseline=True))
    cases.register(cases.Variant(name="early", title="e", tasks=tasks, queue="q", order=10))
    assert [v.name for v in cases.variants()] == ["p", "early", "late"]


def _micro(p50: float, p99: float) -> dict:
    return {"p50_us": p50, "p99_us": p99, "n": 300}


def test_report_shows_ledger_decisions_and_lease_share():
    lease = {
        "acquire": _micro(900, 2000),
        "renew": _micro(800, 1500),
        "tick_step": _micro(850, 1600),
        "ttl_s": 30.0,
        "renew_every_s": 5.0,
        "loop_share_p50": 0.00017,
        "loop_share_p99": 0.00032,
    }
    results = copy.deepcopy(RESULTS)
    results["micro"] = {
        "postgresql": {
            "engine": "postgresql",
            "ledger": {"first_claim": _micro(1200, 3000), "duplicate": _micro(1500, 4000)},
            "redis_ledger": {"first_claim": _micro(70, 150), "duplicate": _micro(65, 140)},
            "lease": lease,
        },
        "sqlite": {
            "engine": "sqlite",
            "ledger": {"first_claim": _micro(400, 900), "duplicate": _micro(1300, 3100)},
            "lease": lease,
        },
    }
    lines = report.render(results).splitlines()
    rows = {line.split(" | ")[0].lstrip("| "): line for line in lines}
    assert "| 1,200 / 3,000 | 1,500 / 4,000 | 300 |" in rows["database (PostgreSQL)"]
    assert "| 400 / 900 | 1,300 / 3,100 |" in rows["database (SQLite)"]
    assert "| 70 / 150 | 65 / 140 |" in rows["Redis"]
    ledgers = [row for row in lines if row.startswith(("| database", "| Redis"))]
    assert ledgers[-1].startswith("| Redis")  # the database rows first
    assert "| 5 s | 0.017% / 0.032% | < 1% |" in rows["PostgreSQL"]
    assert "| 900 / 2,000 | 800 / 1,500 | 850 / 1,600 |" in rows["SQLite"]


def _changelist_step(rows, p95):
    figures = {"p50_ms": p95 / 2, "p95_ms": p95, "queries": 12, "queries_min": 12, "n": 7}
    return {"rows": rows, "seed_s": 30.0, "requests": {"first page": figures}}


def test_report_shows_dead_letter_changelist_and_replay():
    results = copy.deepcopy(RESULTS)
    results["dlq"] = {
        "engine": "postgresql",
        "changelist": [_changelist_step(100_000, 80.0), _changelist_step(1_000_000, 350.0)],
        "replay": {
            "rows": 5000,
            "seconds": 2.5,
            "rows_per_s": 2000.0,
            "replayed": 5000,
            "skipped": 0,
            "unroutable": 0,
            "published": 5000,
        },
    }
    lines = report.render(results).splitlines()
    assert "### Dead letters: admin changelist and bulk replay" in lines
    header = next(line for line in lines if line.startswith("| request |"))
    assert "100,000 rows" in header and "1,000,000 rows" in header
    row = next(line for line in lines if line.startswith("| first page |"))
    assert row == "| first page | 40 / 80, 12 | 175 / 350, 12 | missed |"
    replay = next(line for line in lines if line.startswith("| `celery_guard.dlq.replay.replay`"))
    # 2,000 rows/s against plain Celery's 1,000 enqueues/s of the same run.
    assert "| 5,000 | 5,000 | 5,000 | 2.5 | 2,000 | 2.00x | ≥ 1,000 rows/s met |" in replay


def test_dead_letter_report_without_postgresql_or_the_full_run():
    quick = report.dlq_tables({"changelist": [_changelist_step(100_000, 80.0)]})
    assert "| first page | 40 / 80, 12 | not measured (FULL=1) |" in quick.splitlines()
    sqlite = report.dlq_tables(
        {
            "changelist_note": "Changelist timings skipped: they need PostgreSQL.",
            "replay": {
                "rows": 10,
                "seconds": 0.1,
                "rows_per_s": 100.0,
                "replayed": 10,
                "published": 10,
            },
        }
    )
    assert sqlite.startswith("> Changelist timings skipped")
    assert "≥ 1,000 rows/s missed" in sqlite


def test_only_dlq_options_parse_and_refuse_what_they_skip():
    args = parse_args(["--only-dlq", "--dlq-rows", "1000000", "--dlq-rows", "100000"])
    assert args.only_dlq and args.dlq_rows == [1_000_000, 100_000]
    for conflicting in (["--write-docs"], ["--only", "guarded-routing"], ["--dlq-rows", "0"]):
        with pytest.raises(SystemExit):
            parse_args(["--only-dlq", *conflicting])


def test_only_runs_option_parses_and_refuses_what_it_skips():
    assert parse_args(["--only-runs"]).only_runs
    for conflicting in (["--write-docs"], ["--only", "guarded-routing"], ["--only-dlq"]):
        with pytest.raises(SystemExit):
            parse_args(["--only-runs", *conflicting])


def test_report_of_a_dead_letter_only_run():
    results = {
        key: value for key, value in RESULTS.items() if key not in ("variants", "references")
    }
    results["config"] = {"mode": "full", "reps": 7}
    results["dlq"] = {"engine": "postgresql", "changelist": [_changelist_step(1_000_000, 80.0)]}
    lines = report.render(results).splitlines()
    assert lines[0] == "### Machine"
    assert "| mode | full, dead letters only (100 s) |" in lines
    assert "| first page | 40 / 80, 12 | met |" in lines
    assert not any("vs plain Celery" in line or "PING" in line for line in lines)
    assert lines[-1] == "Targets are reported, never asserted."


def test_report_lists_the_issue_targets_per_configuration():
    results = copy.deepcopy(RESULTS)
    results["configs"] = {
        "quick-start": {"title": "quick start", "suffix": "_qs", "env": {}},
        "tuned": {"title": "tuned", "suffix": "", "env": {}},
    }
    results["variants"]["guarded-routing"] = results["variants"].pop("guarded")
    plain = results["variants"]["plain"]["metrics"]
    plain.update(
        drain_noop_rate_qs=_summary(500),
        db_commits_execute=_summary(0),
        db_commits_execute_qs=_summary(0),
        commands_execute_qs=_summary(9),
    )
    results["variants"]["guarded-routing"]["metrics"].update(
        drain_noop_rate_qs=_summary(470),
        db_commits_execute=_summary(0),
        db_commits_execute_qs=_summary(2),
        commands_execute_qs=_summary(9.5),
    )
    replay = {"rows": 10, "replayed": 10, "published": 10, "rows_per_s": 980.0, "seconds": 1.0}
    results["dlq"] = {"replay": replay}
    text = report.render(results)
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines()}
    assert "| target | bound | quick start | tuned |" in text
    drain = rows["no-op drain, routing only"]
    assert drain.endswith("| 0.94x met | 0.80x missed |")
    commits = rows["extra database commits per guarded run, routing only"]
    assert commits.endswith("| +2.00 missed | +0.00 met |")
    assert rows["extra Redis commands per guarded run, routing only"].endswith(
        "| +0.50 met | +3.00 missed |"
    )
    assert rows["enqueue, routing only"].endswith("| 0.70x missed | 0.70x missed |")
    assert rows["no-op drain, key on the Redis ledger"].endswith("| not run | not run |")
    assert rows["bulk replay vs plain Celery enqueue"].endswith("| 0.98x met | 0.98x met |")


def test_report_shows_the_events_cost_per_task_as_ratios_to_plain_celery():
    from bench import observability

    per_task = {
        "plain": [50.0, 50.0],
        "bare": [80.0, 80.0],
        "context": [84.0, 84.0],
        "logs": [90.0, 90.0],
        "logs_rollups": [95.0, 95.0],
        "all": [110.0, 110.0],
    }
    obs = {
        "n": 2000,
        "reps": 2,
        "metrics_enabled": True,
        "multiprocess": True,
        "per_task_us": {name: stats.summarize(runs) for name, runs in per_task.items()},
    }
    found = observability.figures(obs, worker_noop_us=4000.0)
    assert found["plain"]["ratio_in_process"] == 1.0
    assert found["bare"]["events_us"] is None  # the guard's wrapper is not an event
    assert found["all"]["events_us"] == 30.0
    assert found["all"]["ratio_in_process"] == 50 / 110
    assert found["all"]["events_ratio_10ms"] == 10_050 / 10_080
    assert found["all"]["events_ratio_worker_noop"] == 4000 / 4030
    # The worker's per-task time comes from the plain side's median no-op drain rate.
    assert observability.worker_noop_us(RESULTS) == 2 / 500 * 1e6
    text = report.render({**RESULTS, "observability": obs})
    assert "### Observability: the events' cost per task (in process)" in text
    row = next(line for line in text.splitlines() if line.startswith("| + Prometheus"))
    assert row == (
        "| + Prometheus (multiprocess) | 110.0 (110.0..110.0) | 30.0 | 0.45x | 0.997x | 0.993x |"
    )
    assert "the plain worker's no-op task: 4,000 µs per process" in text


def test_report_shows_bulk_run_start_drain_and_memory():
    summary = {"median": 100.0, "min": 90.0, "max": 110.0, "runs": 3}
    results = copy.deepcopy(RESULTS)
    results["runs"] = {
        "engine": "postgresql",
        "claims": {
            "n": 8000,
            "redis": {"one_by_one_s": 4.0, "bulk_s": 0.5, "ratio": 8.0},
            "database": {"one_by_one_s": 12.0, "bulk_s": 0.6, "ratio": 20.0},
        },
        "start": {
            "n": 8000,
            "redis": {"seconds": 8.0, "items_per_s": 1000.0},
            "database": {"seconds": 9.0, "items_per_s": 889.0},
            "plain_apply_async": {"seconds": 6.0, "items_per_s": 1333.0},
        },
        "memory": {"peak_bytes": {"2000": 2**21, "8000": 2**21 + 2**19}, "ratio_4n_to_n": 1.25},
        "drain": {
            "n": 300,
            "reps": 3,
            "per_s": {"plain_group": summary, "guarded_group": summary, "run": summary},
            "publish_s": {
                kind: {"median": 1.5} for kind in ("plain_group", "guarded_group", "run")
            },
            "run_vs_guarded_group": 0.95,
            "run_vs_plain_group": 0.9,
        },
    }
    lines = report.render(results).splitlines()
    assert "### Bulk runs: start, drain against a group, memory" in lines
    assert "| database | 12.00 | 0.60 | 20.0 |" in lines
    assert "| redis ledger | 8.00 | 1,000 |" in lines
    assert "| traced (MiB) | 2.0 | 2.5 | 1.25 |" in lines
    assert "| guarded task, `group` | 100 | 1.50 | 0.95 |" in lines
    assert not any(
        "its keys on the Redis ledger" in line or "ms per item" in line for line in lines
    )


def _small_runs() -> dict:
    """The start, claims and memory figures of a small bulk-runs section."""
    return {
        "engine": "postgresql",
        "claims": {
            "n": 10,
            "redis": {"one_by_one_s": 1.0, "bulk_s": 0.5, "ratio": 2.0},
            "database": {"one_by_one_s": 1.0, "bulk_s": 0.5, "ratio": 2.0},
        },
        "start": {
            "n": 10,
            "redis": {"seconds": 1.0, "items_per_s": 10.0},
            "database": {"seconds": 1.0, "items_per_s": 10.0},
            "plain_apply_async": {"seconds": 1.0, "items_per_s": 10.0},
        },
        "memory": {"peak_bytes": {"10": 2**20, "40": 2**20}, "ratio_4n_to_n": 1.0},
    }


def test_report_shows_the_bookkeeping_per_item_and_the_run_on_the_redis_ledger():
    summary = {"median": 100.0, "min": 90.0, "max": 110.0, "runs": 3}
    results = copy.deepcopy(RESULTS)
    kinds = ("plain_group", "guarded_group", "run", "run_redis")
    results["runs"] = {
        **_small_runs(),
        "bookkeeping": {
            "n": 1000,
            "ms_per_item": {"one_statement": 1.5, "portable": 9.25},
            "statements_per_item": {"one_statement": 2, "portable": 6},
            "ratio": 6.2,
        },
        "drain": {
            "n": 300,
            "reps": 3,
            "per_s": dict.fromkeys(kinds, summary),
            "publish_s": {kind: {"median": 0.5} for kind in kinds},
            "run_vs_guarded_group": 0.5,
            "run_vs_plain_group": 0.5,
            "run_redis_vs_guarded_group": 0.8,
        },
    }
    lines = report.render(results).splitlines()
    assert "| one statement each, asynchronous commit (PostgreSQL) | 1.50 | 2 |" in lines
    assert "| a transaction of several statements (SQLite; PostgreSQL before) | 9.25 | 6 |" in lines
    assert (
        "| the bulk run, its keys on the Redis ledger | 100 | 0.50 | (vs the guarded group: 0.80) |"
        in lines
    )


def test_report_compares_the_limits_with_the_same_task_without_them():
    results = copy.deepcopy(RESULTS)
    results["configs"] = {
        "quick-start": {"title": "quick start", "suffix": "_qs", "env": {}},
        "tuned": {"title": "tuned", "suffix": "", "env": {}},
    }
    routing = results["variants"]["guarded-routing"] = results["variants"].pop("guarded")
    routing["metrics"].update(drain_sleep_rate=_summary(150), drain_sleep_rate_qs=_summary(150))
    results["variants"]["plain"]["metrics"].update(
        drain_sleep_rate=_summary(160), drain_sleep_rate_qs=_summary(160)
    )
    results["variants"]["guarded-limits-db"] = {
        "title": "limits (database)",
        "baseline": False,
        "targets": {},
        "reference": "guarded-routing",
        "reference_targets": {"drain_sleep_rate": 0.95},
        "commands_last_run": {},
        "metrics": {
            "drain_sleep_rate": _summary(144),  # 0.96x routing, 0.90x plain
            "drain_sleep_rate_qs": _summary(141),  # 0.94x routing
        },
    }
    rules = [{"scope": "task:t", "concurrency": 10000, "rate": "1000000/h"}]
    results["limit_trips"] = {
        "guarded-limits": {
            "admit": 1.0,
            "release": 1.5,
            "per_task": 2.5,
            "n": 2,
            "store": "Redis",
            "unit": "round trips",
            "rules": rules,
        },
        "guarded-limits-db": {
            "admit": 1.0,
            "release": 1.0,
            "per_task": 2.0,
            "n": 2,
            "store": "PostgreSQL",
            "unit": "round trips",
            "rules": rules,
        },
    }
    lines = report.render(results).splitlines()
    ratio = next(
        line for line in lines if line.startswith("| drain, 10 ms task: limits (database)")
    )
    assert ratio.endswith("| ≥ 0.95x | 0.94x missed | 0.96x met |")
    redis_trips = next(line for line in lines if line.startswith("| Redis round trips per task"))
    assert "[task:t: concurrency 10000, rate 1000000/h] | ≤ 2 |" in redis_trips
    assert redis_trips.endswith("| 2.50 (admit 1.00 + release 1.50) missed |")
    db_trips = next(line for line in lines if line.startswith("| database round trips per task"))
    assert db_trips.endswith(
        "| reported | 2.00 (admit 1.00 + release 1.00) |" + " 2.00 (admit 1.00 + release 1.00) |"
    )
    # Next to the vs-plain rows of the variant's own table, the same drain vs routing only.
    vs_routing = next(
        line
        for line in lines
        if line.startswith("| drain, 10 ms task (tasks/s), vs guarded: routing only")
    )
    assert "| 0.96x vs guarded: routing only | ≥ 0.95x met |" in vs_routing
    own = lines[lines.index("### limits (database) vs plain Celery") :]
    vs_plain = next(line for line in own if line.startswith("| drain, 10 ms task (tasks/s) |"))
    assert vs_plain.endswith("| 0.90x |  |")  # no target against plain Celery


def test_report_checks_the_run_against_the_keyed_group_and_keeps_the_other_rows():
    summary = {"median": 100.0, "min": 90.0, "max": 110.0, "runs": 3}
    keyed = {"median": 110.0, "min": 100.0, "max": 120.0, "runs": 3}
    results = copy.deepcopy(RESULTS)
    kinds = ("plain_group", "guarded_group", "run", "run_redis")
    results["runs"] = {
        **_small_runs(),
        "drain": {
            "n": 300,
            "reps": 3,
            "per_s": {
                **dict.fromkeys(kinds, summary),
                "keyed_group": keyed,
                "keyed_group_redis": keyed,
            },
            "publish_s": {kind: {"median": 0.5} for kind in (*kinds, "keyed_group")},
            "run_vs_guarded_group": 0.5,
            "run_vs_plain_group": 0.5,
            "run_vs_keyed_group": 0.91,
            "run_redis_vs_guarded_group": 0.8,
            "run_redis_vs_keyed_group_redis": 0.93,
        },
    }
    lines = report.render(results).splitlines()
    assert (
        "| guarded task, `group`, a key per call (the same tasks without a run: the target) "
        "| 110 | 0.50 | **0.91** |" in lines
    )
    assert (
        "| the keyed `group`, its keys on the Redis ledger | 110 | 0.00 | "
        "(the run on Redis / this: 0.93) |" in lines
    )
    assert "| guarded task, `group` | 100 | 0.50 | 0.50 |" in lines
    assert "| guarded task, bulk run | 100 | 0.50 | 1.00 |" in lines
    assert (
        "| the bulk run, its keys on the Redis ledger | 100 | 0.50 | (vs the guarded group: 0.80) |"
        in lines
    )


def test_db_counts_sort_commits_by_table_and_add_up_every_process(tmp_path, monkeypatch):
    from bench import dbcount

    assert dbcount.KINDS[dbcount._kind('SELECT * FROM "celery_guard_taskpolicy"')] == "policy"
    assert dbcount.KINDS[dbcount._kind('UPDATE "celery_guard_taskminute" SET')] == "rollups"
    assert dbcount.KINDS[dbcount._kind('UPDATE "celery_guard_deliverylease" SET')] == "poller"
    assert dbcount.KINDS[dbcount._kind('UPDATE "celery_guard_idempotencyrecord"')] == "task"
    monkeypatch.setenv(dbcount.ENV, str(tmp_path))
    monkeypatch.setattr(dbcount, "_counts", [0] * len(dbcount.KINDS))
    monkeypatch.setattr(dbcount, "_file", [None])
    for kind in (0, 0, 1, 3):
        dbcount._bump(kind)
    (tmp_path / "1.counts").write_bytes(dbcount._FORMAT.pack(5, 0, 2, 0))
    assert dbcount.read(str(tmp_path)) == {"task": 7, "policy": 1, "rollups": 2, "poller": 1}
    # The runner leaves its own process out (its publishes are not the worker's).
    assert dbcount.read(str(tmp_path), exclude=1) == {
        "task": 2,
        "policy": 1,
        "rollups": 0,
        "poller": 1,
    }
