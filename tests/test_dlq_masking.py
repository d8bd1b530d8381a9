"""Secrets passed as arguments are masked in a dead letter's free text, its page and the logs."""

import pytest
from django.urls import reverse

from celery_guard.core import redaction
from celery_guard.dlq import records as deadletter
from celery_guard.models import DeadLetter
from tests.dlq_support import dead_letter, staff
from tests.harness import wait_until
from tests.testapp import dlq_tasks

CARD = "4111111111111111"  # positional: masked by the name of its parameter
KEY = "sk-live-abc123"  # keyword: masked by its key


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_secret_arguments_are_masked_in_the_stored_text_the_page_and_the_worker_log(
    client, start_worker
):
    dlq_tasks.dlq_leaky.apply_async(args=[CARD], kwargs={"api_key": KEY, "note": "visible"})
    worker = start_worker(["default"])
    row = wait_until(lambda: DeadLetter.objects.filter(task_name=dlq_tasks.dlq_leaky.name).first())
    assert row.reason == "exhausted" and len(row.history) == 2
    # Replay needs the real arguments: they are stored as sent.
    assert row.args == [CARD] and row.kwargs["api_key"] == KEY
    stored = [row.message, row.traceback, str(row.history), str(row.headers)]
    for text in stored:
        assert CARD not in text and KEY not in text
    assert "visible" in row.message and redaction.MASK in row.message
    assert all(redaction.MASK in entry["message"] for entry in row.history)
    client.force_login(staff("viewer"))
    page = client.get(reverse("admin:celery_guard_deadletter_change", args=[row.pk]))
    assert page.status_code == 200
    assert CARD.encode() not in page.content and KEY.encode() not in page.content
    worker.stop()
    log = worker.log_path.read_text(errors="replace")
    assert "dlq_leaky" in log  # Celery logged the retry and the failure...
    assert CARD not in log and KEY not in log  # ...masked


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
    settings.CELERY_GUARD_REDACTOR = "tests.test_dlq_masking.mask_first_arg"
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


def test_short_values_are_not_masked_in_text():
    assert redaction.mask_text("id 123 of 1234", {"123"}) == "id 123 of 1234"
    assert redaction.mask_text("a 'x\\ny-z' b", {"x\ny-z"}) == f"a '{redaction.MASK}' b"


def mask_first_arg(data, *, task_name):
    data["args"] = [redaction.MASK, *data["args"][1:]]
    return data
