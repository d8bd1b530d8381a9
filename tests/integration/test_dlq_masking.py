"""Masked secrets on the database: rows written before, the redactor hook on free text."""

import pytest
from django.urls import reverse

from celery_guard.core import redaction
from celery_guard.dlq import records as deadletter
from tests.support.dlq import dead_letter, staff
from tests.testapp import dlq_tasks


@pytest.mark.django_db
def test_rows_written_before_are_masked_on_the_page_unless_revealed(client):
    row = dead_letter(
        "old",
        kwargs={"password": "hunter22"},
        message="login as bob with hunter22 failed",
        traceback="Traceback...\nValueError: login as bob with 'hunter22' failed",
        history=[{"attempt": 1, "error": "builtins.ValueError", "message": "hunter22 refused"}],
    )
    url = reverse("admin:celery_guard_deadletter_change", args=[row.pk])
    client.force_login(staff("viewer"))
    assert b"hunter22" not in client.get(url).content
    client.force_login(staff("editor", "edit_deadletter"))
    assert b"hunter22" not in client.get(url).content
    assert b"hunter22" in client.get(url + "?reveal=1").content


@pytest.mark.django_db
def test_the_redactor_hook_decides_for_free_text_too(settings):
    settings.CELERY_GUARD_REDACTOR = "tests.integration.test_dlq_masking.mask_first_arg"
    failure = deadletter.Failure(
        task_name=dlq_tasks.dlq_plain.name,
        task_id="t-1",
        reason="permanent",
        exception_class="builtins.ValueError",
        message="label top-secret-label unknown (count 7)",
        args=["top-secret-label", 7],
        history=[{"attempt": 1, "message": "top-secret-label again"}],
    )
    row = deadletter.write(failure)
    assert "top-secret-label" not in row.message + str(row.history)
    assert row.message == f"label {redaction.MASK} unknown (count 7)"  # the hook showed 7


def mask_first_arg(data, *, task_name):
    data["args"] = [redaction.MASK, *data["args"][1:]]
    return data
