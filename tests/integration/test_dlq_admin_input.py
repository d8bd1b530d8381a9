"""Hostile or careless input to the dead-letter admin: a form error or a 400, never a 500."""

import json

import pytest
from django.urls import reverse

from celery_guard.dlq import admin as dlq_admin
from celery_guard.models import DeadLetterReplay
from tests.support.dlq import dead_letter, staff
from tests.support.harness import queue_length


def tool_url(name, row):
    return reverse(f"admin:celery_guard_deadletter_{name}", args=[row.pk])


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("args", "kwargs", "error"),
    [
        ('["x"]', '{"note": NaN}', "is not valid JSON (NaN and infinities are not)"),
        ('["x"]', '{"note": Infinity}', "is not valid JSON (NaN and infinities are not)"),
        ('["x\\u0000"]', "{}", "args[0]: contains a NUL character"),
        ("[" * 100_000 + "]" * 100_000, "{}", "args is nested too deeply"),
        ("[" * 110 + '"x"' + "]" * 110, "{}", "nested more than 100 levels"),
        ('["' + "a" * 400_000 + '"]', "{}", "over CELERY_GUARD_MAX_PAYLOAD_BYTES (262144)"),
    ],
    ids=["nan", "infinity", "nul", "deep-100000", "deep-110", "400KB"],
)
def test_edit_and_replay_refuses_what_enqueue_refuses(
    client, redis_url, queues, args, kwargs, error
):
    row = dead_letter("hostile")
    client.force_login(staff("editor", "replay_deadletter", "edit_deadletter"))
    url = tool_url("edit_replay", row)
    preview = client.post(url, {"args": args, "kwargs": kwargs, "preview": "1"})
    assert preview.status_code == 200
    assert error in preview.context["error"]
    assert b"cg-confirm" not in preview.content
    # A crafted confirm (the digest an unchecked preview would have shown) is refused alike.
    try:
        digest = dlq_admin._digest(*(json.loads(t) for t in (args, kwargs)))
    except (RecursionError, ValueError):
        digest = "x"
    confirm = client.post(
        url, {"args": args, "kwargs": kwargs, "confirm": "1", "previewed": digest}
    )
    assert confirm.status_code == 200
    assert error in confirm.context["error"]
    assert queue_length(redis_url, queues["default"]) == 0
    assert not DeadLetterReplay.objects.filter(dead_letter=row).exists()


CHANGELIST = "admin:celery_guard_deadletter_changelist"


@pytest.mark.django_db
@pytest.mark.parametrize(
    "query",
    [
        "q=²",
        "q=%00",
        "q=12%003",
        "q=99999999999999999999999",
        "q=9223372036854775808",
        "q=" + "9" * 5000,
        "task_name=%00",
        "task_name__exact=a%00b",
        "reason__exact=%00",
        "status=%00",
        "exception_class=%00",
        "queue=%00",
        "failed_at__year=%00",
        "failed_at__year=99999999999",
        "failed_at__year=2024&failed_at__month=13",
        "failed_at__year=2024&failed_at__month=2&failed_at__day=31",
        "p=%00",
        "p=99999999999999999999",
        "o=%00",
    ],
)
def test_hostile_changelist_queries_are_a_400_or_an_empty_result(client, query):
    row = dead_letter("listed")
    client.force_login(staff("viewer"))
    response = client.get(f"{reverse(CHANGELIST)}?{query}")
    # 200 (nothing matches), 302 (Django's "?e=1" for bad lookups) or 400: never a 500.
    assert response.status_code in (200, 302, 400), response.status_code
    if response.status_code == 200 and query.startswith(("task_name", "reason")):
        assert row not in response.context["cl"].result_list


@pytest.mark.django_db
@pytest.mark.parametrize(
    "url",
    [
        "javascript:alert(document.cookie)//{event_id}",
        "JavaScript:alert(1)//{event_id}",
        "java\tscript:alert(1)//{event_id}",
        "data:text/html,<script>alert(1)</script>{event_id}",
        "//sentry.example/{event_id}",
        "https:///{event_id}",
    ],
)
def test_a_sentry_url_that_is_not_http_is_an_error_and_never_a_link(client, settings, url):
    from tests.support import checks

    settings.CELERY_GUARD_SENTRY_EVENT_URL = url
    [error] = checks.check_setting_values()
    assert error.id == "celery_guard.E001"
    assert "must be an http:// or https:// URL" in error.msg
    row = dead_letter("sentry", sentry_event_id="abc123")
    client.force_login(staff("viewer"))
    page = client.get(reverse("admin:celery_guard_deadletter_change", args=[row.pk]))
    content = page.content.decode()
    assert "abc123" in content
    assert "script:" not in content.lower() and "data:text" not in content
    assert 'rel="noopener"' not in content  # no Sentry link at all


def test_http_sentry_urls_pass(settings):
    from tests.support import checks

    for url in ("https://sentry.example/issues/?query={event_id}", "http://s.local/{event_id}"):
        settings.CELERY_GUARD_SENTRY_EVENT_URL = url
        assert checks.check_setting_values() == []
