"""The dead-letter admin in a real browser (Playwright + Debian's chromium) on a live server.

Skipped locally when chromium or Playwright is missing; a failure when ``CI`` is set.
"""

import os
import shutil

import pytest

from celery_guard.models import DeadLetter
from tests.support.dlq import dead_letter, staff
from tests.support.fixtures import IN_CI
from tests.support.harness import ARTIFACTS, queue_length

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("empty_queues"),
]

CHROMIUM = os.environ.get("CG_CHROMIUM", "/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def sync_playwright():
    """Playwright's sync API, or skip (fail in CI) when it or chromium is missing."""
    try:
        from playwright.sync_api import sync_playwright as start
    except ImportError:
        start = None
    missing = "playwright is not installed" if start is None else None
    if missing is None and not (os.path.exists(CHROMIUM) or shutil.which(CHROMIUM)):
        missing = f"chromium not found at {CHROMIUM}"
    if missing:
        if IN_CI:
            pytest.fail(f"{missing}: CI must run the browser test", pytrace=False)
        pytest.skip(missing)
    return start()


def test_operator_filters_and_replays_a_dead_letter(live_server, monkeypatch, redis_url, queues):
    # Playwright's sync API runs an event loop in this thread; the ORM calls here are still
    # synchronous ones made between browser steps.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    target = dead_letter("browser-target", reason="exhausted")
    other = dead_letter("browser-other")
    staff("browser", "replay_deadletter")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1600, "height": 900})
        try:
            page.goto(f"{live_server.url}/admin/login/?next=/admin/celery_guard/deadletter/")
            page.fill("#id_username", "browser")
            page.fill("#id_password", "pw")
            page.click("input[type=submit]")
            page.wait_for_selector("#result_list")
            page.click("#changelist-filter a[href*='reason__exact=exhausted']")
            page.wait_for_url("**reason__exact=exhausted**")
            rows = page.locator("#result_list tbody tr")
            assert rows.count() == 1
            rows.first.locator("input.action-select").check()
            page.select_option("select[name=action]", "replay_selected")
            page.click("button[name=index]")
            message = page.locator(".messagelist .success")
            message.wait_for()
            assert "1 replayed, 0 skipped" in message.inner_text()
            assert "replayed" in page.locator("#result_list tbody tr td.field-status").inner_text()
        finally:
            # Also when a step failed: the screenshot then shows where it stopped.
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "dlq-replay.png"), full_page=True)
            browser.close()
    target.refresh_from_db()
    other.refresh_from_db()
    assert (target.status, other.status) == (DeadLetter.Status.REPLAYED, DeadLetter.Status.DEAD)
    assert queue_length(redis_url, queues["default"]) == 1
