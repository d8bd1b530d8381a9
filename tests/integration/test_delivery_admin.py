"""Admin: outbox rows with age and last error; the Redis schedule's next messages."""

import pytest
from django.urls import reverse

from celery_guard.delivery.schedule import RedisSchedule
from tests.support.admin_rows import outbox_row
from tests.testapp.outbox_tasks import sched_job

pytestmark = pytest.mark.django_db(transaction=True)


def test_changelist_shows_pending_rows_and_scheduled_messages(admin_client, redis_url):
    outbox_row("t-pending", last_error="OperationalError: broker down")
    sched_job.apply_async(("admin-scheduled",), countdown=3600, task_id="t-scheduled")
    url = reverse("admin:celery_guard_outboxmessage_changelist")
    page = admin_client.get(url).content.decode()
    assert "t-pending" in page
    assert "OperationalError: broker down" in page
    assert "300s" in page or "301s" in page  # the age
    assert "t-scheduled" in page and sched_job.name in page
    filtered = admin_client.get(url, {"scheduled": "other.task"}).content.decode()
    assert "t-scheduled" not in filtered
    held = RedisSchedule(sched_job.app)
    held.client.delete(held.key)
