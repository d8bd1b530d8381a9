"""Admin of the idempotency ledger: read-only, with a "release" action behind its permission."""

import pytest
from django.contrib.auth.models import Permission, User
from django.urls import reverse

from celery_guard.idempotency import ledger
from celery_guard.models import IdempotencyRecord

pytestmark = pytest.mark.django_db

CHANGELIST = "admin:celery_guard_idempotencyrecord_changelist"


@pytest.fixture
def record():
    ledger.DatabaseLedger().claim("t:k", task_name="t", task_id="t1", fingerprint="f", window=60)
    return IdempotencyRecord.objects.get()


def staff(client, *codenames):
    user = User.objects.create_user("op", password="pw", is_staff=True)
    user.user_permissions.set(Permission.objects.filter(codename__in=codenames))
    client.force_login(user)
    return user


def release_post(client, record):
    return client.post(
        reverse(CHANGELIST),
        {"action": "release_keys", "_selected_action": [record.pk]},
        follow=True,
    )


def test_viewer_without_release_permission_sees_no_action_and_cannot_post_it(client, record):
    staff(client, "view_idempotencyrecord")
    page = client.get(reverse(CHANGELIST))
    assert page.status_code == 200
    assert b"t:k" in page.content
    assert b"pending (publish unconfirmed)" in page.content
    assert b"release_keys" not in page.content
    assert b"delete_selected" not in page.content
    response = release_post(client, record)
    assert response.status_code == 200
    record.refresh_from_db()
    assert record.state == "pending"  # the crafted POST changed nothing
    detail = client.get(reverse("admin:celery_guard_idempotencyrecord_change", args=[record.pk]))
    assert detail.status_code == 200
    assert b'name="_save"' not in detail.content  # read-only
    assert client.get(reverse("admin:celery_guard_idempotencyrecord_add")).status_code == 403


def test_release_permission_shows_the_action_and_releases(client, record):
    staff(client, "view_idempotencyrecord", "release_idempotencyrecord")
    assert b"release_keys" in client.get(reverse(CHANGELIST)).content
    response = release_post(client, record)
    assert b"Released 1 of 1 key(s)." in response.content
    assert b"pending (publish unconfirmed)" not in response.content
    record.refresh_from_db()
    assert record.state == "released"


def test_the_state_column_tells_the_kinds_of_pending_apart():
    store = ledger.DatabaseLedger()
    store.claim("t:k", task_name="t", task_id="t1", fingerprint="f", window=60)
    assert IdempotencyRecord.objects.get().state_detail() == "pending (publish unconfirmed)"
    store.confirm("t:k", "t1")
    assert IdempotencyRecord.objects.get().state_detail() == "pending (published)"
    run = store.start(
        "t:k", task_name="t", task_id="t1", fingerprint="f", window=60, owner="w", lease=60
    )
    assert IdempotencyRecord.objects.get().state_detail() == "running"
    store.yield_lease("t:k", owner="w", token=run.fencing_token)
    assert IdempotencyRecord.objects.get().state_detail() == "pending (retry)"


def test_keys_claimed_and_never_started_show_in_the_state_the_filter_and_doctor(client):
    from celery_guard.management import doctor

    store = ledger.DatabaseLedger()
    for key in ("t:lost", "t:queued"):
        store.claim(key, task_name="t", task_id=key, fingerprint="f", window=60)
    store.confirm("t:lost", "t:lost", start_within=0)
    store.confirm("t:queued", "t:queued", start_within=60)
    lost = IdempotencyRecord.objects.get(key="t:lost")
    assert lost.state_detail() == "pending (claimed, never started)"
    assert IdempotencyRecord.objects.get(key="t:queued").state_detail() == "pending (published)"
    staff(client, "view_idempotencyrecord")
    page = client.get(reverse(CHANGELIST), {"start": "never"})
    assert b"t:lost" in page.content
    assert b"t:queued" not in page.content
    report = doctor.Report()
    doctor._check_never_started(report)
    assert report.lines == [
        (
            "warning",
            "idempotency keys claimed, never started: 1 (published, no worker started them by "
            "their start-by time: lost messages; the next enqueue of each runs it; see the "
            "admin's 'claimed, never started' filter)",
        )
    ]
