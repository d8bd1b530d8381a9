"""Admin flows in a real browser (Playwright + Debian's chromium) on the live server, no worker.

One browser for the module (starting chromium costs seconds); each test logs in its own user
in a fresh context. Screenshots go to test-artifacts/ (also when a step failed).
Skipped locally when chromium or Playwright is missing; a failure when ``CI`` is set.
"""

import os
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from django.contrib.admin.models import LogEntry
from django.contrib.auth.models import Permission, User

from celery_guard.models import (
    BeatFire,
    BulkRun,
    BulkRunItem,
    DeadLetter,
    DeadLetterReplay,
    TaskPolicy,
)
from tests.acceptance.test_dlq_browser import ARGS, CHROMIUM, sync_playwright
from tests.support.admin_rows import leader_lease, outbox_row
from tests.support.dlq import dead_letter, staff
from tests.support.harness import ARTIFACTS
from tests.support.runs import run_in_progress, run_staff

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("empty_queues"),
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless chromium for every test of the module."""
    # Playwright's sync API runs an event loop in this thread for the whole module; the ORM
    # calls of the tests and of pytest-django's fixtures are synchronous ones between steps.
    before = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    try:
        with sync_playwright() as pw:
            started = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            yield started
            started.close()
    finally:
        if before is None:
            os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
        else:
            os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = before


@pytest.fixture
def page(browser: Any, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A fresh browser context (no cookies); a screenshot named after the test at the end."""
    context = browser.new_context(viewport={"width": 1500, "height": 1000})
    context.set_default_timeout(10_000)
    opened = context.new_page()
    try:
        yield opened
    finally:
        ARTIFACTS.mkdir(exist_ok=True)
        name = request.node.name.removeprefix("test_")[:60]
        opened.screenshot(path=str(ARTIFACTS / f"admin-{name}.png"), full_page=True)
        context.close()


def log_in(page: Any, live_server: Any, username: str, next_url: str) -> None:
    page.goto(f"{live_server.url}/admin/login/?next={next_url}")
    page.fill("#id_username", username)
    page.fill("#id_password", "pw")
    page.click("input[type=submit]")
    page.wait_for_url(f"**{next_url}**")


def test_dlq_replay_without_permission_is_not_offered_and_a_forged_post_is_refused(
    live_server, page, redis_url, queues
):
    letter = dead_letter("browser-noperm", reason="exhausted")
    staff("viewer")  # view_deadletter only
    log_in(page, live_server, "viewer", "/admin/celery_guard/deadletter/")
    page.wait_for_selector("#result_list")
    assert page.locator("#result_list tbody tr").count() == 1
    offered = page.locator("select[name=action] option").evaluate_all(
        "options => options.map(o => o.value)"
    )
    assert "replay_selected" not in offered
    assert "discard_selected" not in offered

    page.click(f"#result_list a[href*='/deadletter/{letter.pk}/']")
    page.wait_for_selector("#content-main, #content")
    assert page.locator("#cg-replay").count() == 0
    assert page.locator("#cg-edit-replay").count() == 0
    assert page.locator("#cg-discard").count() == 0
    page.screenshot(path=str(ARTIFACTS / "admin-dlq-detail-no-permission.png"), full_page=True)

    # The action posted by hand (the session and CSRF token of this browser): refused.
    token = next(c["value"] for c in page.context.cookies() if c["name"] == "csrftoken")
    response = page.request.post(
        f"{live_server.url}/admin/celery_guard/deadletter/",
        form={"action": "replay_selected", "_selected_action": str(letter.pk), "index": "0"},
        headers={"X-CSRFToken": token, "Referer": f"{live_server.url}/admin/"},
    )
    assert response.status == 403
    replay = page.request.post(
        f"{live_server.url}/admin/celery_guard/deadletter/{letter.pk}/replay/",
        headers={"X-CSRFToken": token, "Referer": f"{live_server.url}/admin/"},
    )
    assert replay.status == 403
    letter.refresh_from_db()
    assert letter.status == DeadLetter.Status.DEAD
    assert not DeadLetterReplay.objects.exists()


def test_run_card_retries_the_failed_items_then_cancels_the_rest(live_server, page):
    run = run_in_progress(total=40, done=30, failed_every=9)
    failed = run.failed
    assert failed > 0 and run.pending == 10
    run_staff("runs", "retry_bulkrun", "cancel_bulkrun")
    card = f"/admin/celery_guard/bulkrun/{run.pk}/change/"
    log_in(page, live_server, "runs", card)
    page.wait_for_selector("#cg-run-card")

    page.click("#cg-retry")
    message = page.locator(".messagelist li")
    message.wait_for()
    assert f"{failed} failed item(s) retried as run #" in message.inner_text()
    child = BulkRun.objects.get(parent=run)
    assert child.total == failed
    assert BulkRunItem.objects.filter(run=child).count() == failed

    page.click("#cg-cancel")
    page.wait_for_selector(".messagelist li:has-text('cancelled')")
    assert f"Run #{run.pk} cancelled: 10 pending item(s)." in page.inner_text(".messagelist")
    run.refresh_from_db()
    assert run.cancelled == 10
    assert not BulkRunItem.objects.filter(run=run, status=BulkRunItem.Status.PENDING).exists()
    # The run is over: the card offers no second cancel.
    page.wait_for_selector("#cg-run-card")
    assert page.locator("#cg-cancel").count() == 0


def test_beat_leader_fires_and_outbox_pages(live_server, page):
    now = datetime.now(timezone.utc)
    leader_lease()
    slot = now.replace(second=0, microsecond=0) - timedelta(hours=1)
    for i, status in enumerate(["fired", "missed", "fired", "skipped"]):
        BeatFire.objects.create(
            entry="nightly", slot=slot + timedelta(minutes=i), status=status, token=7, fired_at=now
        )
    outbox_row("t-browser-pending", last_error="OperationalError: broker down")
    outbox_row("t-browser-done", age=540, state="dispatched", dispatched_at=now)
    User.objects.create_superuser("ops", password="pw")

    log_in(page, live_server, "ops", "/admin/celery_guard/beatlease/")
    leader = page.locator("#result_list tbody tr")
    assert leader.count() == 1
    assert "host-a:42:abc" in leader.inner_text()
    assert leader.locator("td.field-live img[alt=True]").count() == 1
    assert page.locator(".object-tools a.addlink").count() == 0  # read-only
    page.screenshot(path=str(ARTIFACTS / "admin-beat-leader.png"), full_page=True)

    page.goto(f"{live_server.url}/admin/celery_guard/beatfire/")
    page.wait_for_selector("#result_list")
    assert page.locator("#result_list tbody tr").count() == 4
    page.click("#changelist-filter a[href*='status__exact=missed']")
    page.wait_for_url("**status__exact=missed**")
    assert page.locator("#result_list tbody tr").count() == 1
    page.screenshot(path=str(ARTIFACTS / "admin-beat-fires.png"), full_page=True)

    page.goto(f"{live_server.url}/admin/celery_guard/outboxmessage/")
    page.wait_for_selector("#result_list")
    text = page.inner_text("#result_list")
    assert "t-browser-pending" in text and "t-browser-done" in text
    assert "OperationalError: broker down" in text
    page.click("#changelist-filter a[href*='state__exact=pending']")
    page.wait_for_url("**state__exact=pending**")
    rows = page.locator("#result_list tbody tr")
    assert rows.count() == 1
    assert "t-browser-pending" in rows.inner_text()


def test_task_policy_pause_and_resume_need_the_change_permission(live_server, page):
    TaskPolicy.objects.create(task_name="tests.testapp.tasks.default_job", note="incident 42")
    viewer = User.objects.create_user("viewer", password="pw", is_staff=True)
    viewer.user_permissions.set(Permission.objects.filter(codename="view_taskpolicy"))
    User.objects.create_superuser("ops", password="pw")
    changelist = "/admin/celery_guard/taskpolicy/"

    # A user who may only look sees the policy and no action to pause or resume it.
    log_in(page, live_server, "viewer", changelist)
    assert "tests.testapp.tasks.default_job" in page.inner_text("#result_list")
    assert page.locator("select[name=action] option[value=pause_selected]").count() == 0
    page.context.clear_cookies()

    log_in(page, live_server, "ops", changelist)
    for action, paused, verb in (
        ("pause_selected", True, "paused"),
        ("resume_selected", False, "resumed"),
    ):
        page.check("#result_list tbody input.action-select")
        page.select_option("select[name=action]", action)
        page.click("button[name=index]")
        page.wait_for_selector(f".messagelist li:has-text('{verb}')")
        assert TaskPolicy.objects.get().paused is paused
        assert LogEntry.objects.filter(change_message=f"{verb} (admin action)").count() == 1
        if paused:
            page.screenshot(path=str(ARTIFACTS / "admin-task-policy-paused.png"), full_page=True)
