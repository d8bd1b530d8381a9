"""``make demo`` at a small size: exit status, summary, and the summary against the database.

The demo runs as a user runs it (``python example_project/run_demo.py``), on SQLite and its
own embedded Redis (no service URLs), with its database file kept where the test can read
it afterwards: the summary's figures must be the rows the scenario left.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
from collections import Counter

import pytest

from tests.support.harness import ROOT, wait_until

pytestmark = pytest.mark.timeout(300)

SIZE = 60


def test_demo_runs_the_hr_scenario_and_its_summary_matches_the_database(tmp_path):
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"DATABASE_URL", "REDIS_URL", "AMQP_URL", "CELERY_BROKER_URL"}
        and not key.startswith(("CG_", "DJANGO_"))
    }
    env.update(DEMO_SIZE=str(SIZE), SQLITE_PATH=str(tmp_path / "demo.sqlite3"))
    summary_file = tmp_path / "summary.json"
    log = tmp_path / "demo.log"
    with log.open("w") as out:
        demo = subprocess.Popen(
            [
                sys.executable,
                "example_project/run_demo.py",
                "--port",
                "0",
                "--keep",
                "--json",
                str(summary_file),
            ],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_until(lambda: "--keep:" in log.read_text() or demo.poll() is not None, 240)
            output = log.read_text()
            assert "--keep:" in output, output
            admin = re.search(r"the admin stays up at (\S+)/admin/", output).group(1)
            password = re.search(r"login: +admin / (\S+)", output).group(1)
            pages = _admin_pages(admin, password, output)
        finally:
            demo.send_signal(signal.SIGINT)  # Ctrl-C
            returncode = demo.wait(60)
    output = log.read_text()
    assert returncode == 130, output
    assert "invariants: OK" in output
    assert "stopped every process the demo started" in output
    assert all(status == 200 for status in pages.values()), pages
    summary = json.loads(summary_file.read_text())
    assert summary["problems"] == []
    assert summary["processed"] == summary["sent"] == SIZE
    assert summary["sends_per_employee"] == {"0": 0, "1": SIZE, "2": 0}
    after = summary["sends_per_employee_after_run"]
    assert (after["0"], after["1"], after["2"]) == (
        summary["invalid"],
        SIZE - summary["invalid"],
        0,
    )
    assert summary["deduplicated"] == summary["resubmitted"] > 0
    assert summary["reports"]["run"] == 1
    assert 0 < summary["killed_at"] < SIZE

    db = sqlite3.connect(tmp_path / "demo.sqlite3")
    notifications = Counter(
        employee for (employee,) in db.execute("SELECT employee_id FROM hr_notification")
    )
    assert len(notifications) == SIZE
    assert set(notifications.values()) == {1}
    runs = {
        pk: (total, succeeded, failed, skipped)
        for pk, total, succeeded, failed, skipped in db.execute(
            "SELECT id, total, succeeded, failed, skipped FROM celery_guard_bulkrun"
        )
    }
    ids = summary["runs"]
    assert runs[ids["run"]] == (SIZE, SIZE - summary["invalid"], summary["invalid"], 0)
    resubmitted = summary["resubmitted"]
    assert runs[ids["resubmitted"]] == (resubmitted, 0, 0, summary["deduplicated"])
    if summary["invalid"]:
        assert runs[ids["retry"]] == (summary["invalid"], summary["invalid"], 0, 0)
    ((dead,),) = db.execute("SELECT COUNT(*) FROM celery_guard_deadletter")
    assert dead == summary["dead_lettered"] == summary["invalid"]
    reports = Counter(run for (run,) in db.execute("SELECT run_id FROM hr_reportrecalc"))
    assert reports[ids["run"]] == 1
    assert reports[ids["resubmitted"]] == 0
    ((requested, sent),) = db.execute("SELECT COUNT(*), COUNT(sent_at) FROM hr_passwordreset")
    assert requested == sent == summary["password_resets"] > 0


def _admin_pages(base, password, output):
    """Log in with the printed credentials; the status of each admin URL the summary printed."""
    import requests

    session = requests.Session()
    login = f"{base}/admin/login/"
    session.get(login, timeout=30)
    session.post(
        login,
        data={
            "username": "admin",
            "password": password,
            "csrfmiddlewaretoken": session.cookies["csrftoken"],
            "next": "/admin/",
        },
        headers={"Referer": login},
        timeout=30,
    )
    urls = re.findall(r"(?:run card|DLQ|dashboard): +(\S+)", output)
    assert len(urls) == 3, output
    return {url: session.get(url, timeout=30, allow_redirects=False).status_code for url in urls}
