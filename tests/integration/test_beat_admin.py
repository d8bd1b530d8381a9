"""Admin: read-only changelists of the beat leases and the fire history."""

from datetime import datetime, timedelta, timezone

import pytest
from django.urls import reverse

from celery_guard.models import BeatFire, BeatLease
from tests.support.admin_rows import leader_lease

pytestmark = pytest.mark.django_db

T0 = datetime(2026, 1, 1, 12, tzinfo=timezone.utc)


@pytest.fixture
def rows():
    now = datetime.now(timezone.utc)
    leader_lease()
    for i, status in enumerate(["fired", "missed", "skipped"]):
        BeatFire.objects.create(
            entry="nightly",
            slot=T0 + timedelta(minutes=i),
            status=status,
            token=7,
            fired_at=now,
        )
    BeatFire.objects.create(entry="hourly", slot=T0, status="fired", token=7, fired_at=now)


def test_lease_changelist_shows_the_leader_and_nothing_is_editable(admin_client, rows):
    url = reverse("admin:celery_guard_beatlease_changelist")
    page = admin_client.get(url)
    assert page.status_code == 200
    assert b"host-a:42:abc" in page.content and b"prod-eu" in page.content
    assert admin_client.get(reverse("admin:celery_guard_beatlease_add")).status_code == 403
    lease = BeatLease.objects.get()
    delete = reverse("admin:celery_guard_beatlease_delete", args=[lease.pk])
    assert admin_client.post(delete, {"post": "yes"}).status_code == 403
    assert BeatLease.objects.exists()


def test_fire_history_filters_by_entry_and_status(admin_client, rows):
    url = reverse("admin:celery_guard_beatfire_changelist")
    page = admin_client.get(url, {"entry": "nightly", "status__exact": "missed"})
    assert page.status_code == 200
    assert page.context["cl"].result_count == 1
    assert admin_client.get(url, {"entry": "hourly"}).context["cl"].result_count == 1
    assert admin_client.get(url).context["cl"].result_count == 4
