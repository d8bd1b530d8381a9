"""The suite's levels: a marker per directory, and the fixtures every level may use.

``tests/unit`` (no database, no broker), ``tests/integration`` (database, admin, commands,
ledgers, the broker) and ``tests/acceptance`` (real ``celery worker`` / ``beat`` processes, a
browser). A test is marked with its directory's level: ``pytest -m unit`` runs one level.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest

pytest_plugins = ["tests.support.fixtures", "tests.support.idem", "tests.support.limits"]

HERE = Path(__file__).resolve().parent
IN_CI = bool(os.environ.get("CI"))
LEVELS = ("unit", "integration", "acceptance")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test with the level of its directory; a test outside every level is an error."""
    for item in items:
        parts = Path(item.path).resolve().relative_to(HERE).parts
        if parts[0] not in LEVELS:
            raise pytest.UsageError(f"{item.nodeid}: a test lives in tests/{{{','.join(LEVELS)}}}/")
        item.add_marker(parts[0])


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    """Under ``CI`` a skipped test is a failed one: CI cannot go green by skipping."""
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped under CI, where every test must run: {report.longrepr}"
