"""The run card in a real browser (Playwright + Debian's chromium), with a screenshot."""

import pytest

from tests.acceptance.test_dlq_browser import ARGS, CHROMIUM, sync_playwright
from tests.support.harness import ARTIFACTS
from tests.support.runs import run_in_progress, run_staff

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("empty_queues"),
]


def test_operator_sees_the_run_card_and_filters_an_error_class(live_server, monkeypatch):
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    run = run_in_progress(total=400, done=310, failed_every=9)
    run_staff("browser", "retry_bulkrun", "cancel_bulkrun")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            url = f"/admin/celery_guard/bulkrun/{run.pk}/change/"
            page.goto(f"{live_server.url}/admin/login/?next={url}")
            page.fill("#id_username", "browser")
            page.fill("#id_password", "pw")
            page.click("input[type=submit]")
            page.wait_for_selector("#cg-run-card")
            assert page.inner_text("#cg-processed") == "310 / 400"
            assert page.inner_text("#cg-failed") == str(run.failed)
            assert page.locator("#cg-retry").is_visible()
            assert page.locator("#cg-cancel").is_visible()
            groups = page.locator("#cg-error-groups tr")
            assert groups.count() == 3  # header + two error classes
            page.screenshot(path=str(ARTIFACTS / "run-card.png"), full_page=True)
            page.click("#cg-error-groups a:has-text('HTTPError')")
            page.wait_for_url("**error_class=**")
            rows = page.locator("#cg-items tr")
            assert rows.count() == 1 + 17
            assert "502 from the gateway" in rows.nth(1).inner_text()
        finally:
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "run-card-filtered.png"), full_page=True)
            browser.close()
