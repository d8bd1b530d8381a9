"""Benchmarks that run in a process of their own: start one, and be one (Django set up, JSON out).

A child prints one JSON object as its last ``{``-line; the runner parses it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from bench import naming

ROOT = Path(__file__).resolve().parent.parent


def run(module: str, args: Sequence[str], env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Run ``python -m module args`` (plus the bench's path); return its JSON line.

    Without ``env`` the child sees the runner's environment: the run's database and Redis
    broker, not the SQLite ledger of the idempotency cases.

    Raises:
        RuntimeError: The child failed.
    """
    environ = dict(os.environ if env is None else env)
    if env is None:
        environ.pop(naming.LEDGER_SQLITE_ENV, None)
    environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "example_project")])
    cmd = [sys.executable, "-m", module, *args]
    done = subprocess.run(cmd, env=environ, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{module} failed:\n{done.stderr[-3000:]}")
    line = [row for row in done.stdout.splitlines() if row.startswith("{")][-1]
    result: dict[str, Any] = json.loads(line)
    return result


def main(
    parser: argparse.ArgumentParser,
    argv: list[str] | None,
    measure: Callable[[argparse.Namespace], Any],
) -> int:
    """The child's entry point: parse ``argv``, set Django up, print ``measure(args)`` as JSON."""
    args = parser.parse_args(argv)
    import django

    django.setup()
    print(json.dumps(measure(args)))
    return 0
