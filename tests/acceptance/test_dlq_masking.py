"""Secrets passed as arguments are masked in a dead letter's text, its page and a worker's log."""

import pytest
from django.urls import reverse

from celery_guard.core import redaction
from celery_guard.models import DeadLetter
from tests.support.dlq import staff
from tests.support.harness import wait_until
from tests.testapp import dlq_tasks

CARD = "4111111111111111"  # positional: masked by the name of its parameter
KEY = "sk-live-abc123"  # keyword: masked by its key


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
