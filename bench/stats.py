"""Pure statistics for the benchmark: percentiles, medians with spread, guarded/plain ratios."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def percentile(values: Sequence[float], pct: float) -> float:
    """Return the ``pct`` percentile (0-100) of ``values``, linearly interpolated.

    Raises:
        ValueError: ``values`` is empty or ``pct`` is outside 0-100.
    """
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= pct <= 100:
        raise ValueError(f"percentile must be within 0-100, got {pct}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * pct / 100
    low = math.floor(rank)
    high = math.ceil(rank)
    if low == high:
        return float(ordered[low])
    return float(ordered[low] + (ordered[high] - ordered[low]) * (rank - low))


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """Summarize the per-repetition figures of one metric: median, min, max, IQR, n.

    Returns:
        ``{"median", "min", "max", "q1", "q3", "n", "runs"}``; the figures are ``None`` when
        there are no values.
    """
    runs = [float(v) for v in values]
    if not runs:
        return {
            "median": None,
            "min": None,
            "max": None,
            "q1": None,
            "q3": None,
            "n": 0,
            "runs": [],
        }
    return {
        "median": percentile(runs, 50),
        "min": min(runs),
        "max": max(runs),
        "q1": percentile(runs, 25),
        "q3": percentile(runs, 75),
        "n": len(runs),
        "runs": runs,
    }


def ratio(value: float | None, baseline: float | None) -> float | None:
    """Return ``value / baseline``, or ``None`` when either is missing or the baseline is 0."""
    if value is None or baseline is None or baseline == 0:
        return None
    return value / baseline


def rate(count: int, seconds: float) -> float:
    """Return ``count / seconds`` (operations per second); 0 for a zero duration."""
    return count / seconds if seconds > 0 else 0.0


def commands_per_task(
    before: dict[str, int], after: dict[str, int], tasks: int, own: dict[str, int] | None = None
) -> dict[str, float]:
    """Turn two ``INFO commandstats`` snapshots into commands per task, by command name.

    Args:
        before: Command name -> calls, before the phase.
        after: Command name -> calls, after the phase.
        tasks: Number of tasks the phase handled.
        own: Calls the harness itself made during the phase (its polling, the ``INFO``
            calls), subtracted so only the clients under test are counted.

    Returns:
        Command name -> calls per task, leaving out commands with no net calls.
    """
    own = own or {}
    result: dict[str, float] = {}
    for name in sorted(set(before) | set(after)):
        delta = after.get(name, 0) - before.get(name, 0) - own.get(name, 0)
        if delta > 0 and tasks > 0:
            result[name] = delta / tasks
    return result


def parse_commandstats(info: dict[str, Any]) -> dict[str, int]:
    """Return command name -> calls from redis-py's parsed ``INFO commandstats``."""
    calls: dict[str, int] = {}
    for key, value in info.items():
        if key.startswith("cmdstat_") and isinstance(value, dict):
            calls[key[len("cmdstat_") :]] = int(value.get("calls", 0))
    return calls
