"""Hostile or careless input to the dead-letter admin: a form error or a 400, never a 500."""

import json

import pytest
from django.urls import reverse

from celery_guard.dlq import admin as dlq_admin
from celery_guard.models import DeadLetterReplay
from tests.dlq_support import dead_letter, staff
from tests.harness import queue_length


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
