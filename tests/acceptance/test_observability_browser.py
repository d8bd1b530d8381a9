"""The admin dashboard in a real browser: health per queue, links into the filtered DLQ."""

import datetime as dt

import pytest
from django.contrib.auth.models import Permission, User

from celery_guard.models import Alert
from celery_guard.observability import rollups
from tests.acceptance.test_dlq_browser import ARGS, CHROMIUM, sync_playwright
from tests.support.dlq import dead_letter
from tests.support.harness import ARTIFACTS

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("empty_queues"),
]


def test_dashboard_shows_queue_health_and_links_into_the_dead_letters(
    live_server, monkeypatch, settings
):
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    queues = settings.CELERY_GUARD_PRIORITY_QUEUES
    settings.CELERY_GUARD_SLOS = {f"queue:{queues['high']}": {"start_within": 5}}
    now = dt.datetime.now(dt.timezone.utc)
    for minutes_ago in range(0, 30, 3):
        at = (now - dt.timedelta(minutes=minutes_ago)).timestamp()
        for _ in range(5 + minutes_ago % 7):
            rollups.add("app.fast", queues["default"], counter="started", lag=0.2, now=at)
            rollups.add("app.fast", queues["default"], counter="succeeded", now=at)
            rollups.add("app.slow", queues["high"], counter="started", lag=40, now=at)
            rollups.add("app.slow", queues["high"], counter="succeeded", now=at)
        rollups.add("app.slow", queues["high"], counter="retried", now=at)
    rollups.flush()
    dead_letter("dash-1")
    dead_letter("dash-2")
    dead_letter("dash-other", task_name="app.other", queue=queues["high"])
    Alert.objects.create(
        slo=f"queue:{queues['high']}",
        objective="start_within",
        status="firing",
        value=60,
        threshold=5,
        breached_at=now,
        raised_at=now,
        playbook="https://example.invalid/observability.html#playbook-lag",
    )
    user = User.objects.create_user("dash", password="pw", is_staff=True)
    user.user_permissions.set(
        Permission.objects.filter(
            content_type__app_label="celery_guard",
            codename__in=["view_dashboard", "view_deadletter", "view_alert"],
        )
    )
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        try:
            page.goto(f"{live_server.url}/admin/login/?next=/admin/celery_guard/dashboard/")
            page.fill("#id_username", "dash")
            page.fill("#id_password", "pw")
            page.click("input[type=submit]")
            page.wait_for_selector("#cg-queues")
            high = page.locator(f"tr.cg-queue[data-queue='{queues['high']}']")
            default = page.locator(f"tr.cg-queue[data-queue='{queues['default']}']")
            assert high.locator(".cg-health").inner_text() == "red"
            assert default.locator(".cg-health").inner_text() == "green"
            assert default.locator(".cg-dlq-link").inner_text() == "2"
            assert page.locator("#cg-alerts").inner_text().count("firing") == 1
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
            default.locator(".cg-dlq-link").click()
            page.wait_for_selector("#result_list")
            assert "queue__exact=" in page.url and "status__exact=dead" in page.url
            assert page.locator("#result_list tbody tr").count() == 2
        finally:
            ARTIFACTS.mkdir(exist_ok=True)
            if not (ARTIFACTS / "dashboard.png").exists():
                page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
            browser.close()
