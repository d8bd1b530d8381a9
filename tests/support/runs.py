"""Bulk runs in given states for the admin tests (outcomes recorded through the services)."""

from django.contrib.auth.models import Permission, User

from celery_guard import start_run
from celery_guard.models import BulkRunItem
from celery_guard.runs import services
from tests.testapp.run_tasks import run_complete, run_item

ERRORS = [
    ("celery_guard.exceptions.PermanentError", "employee {n} has no gateway address"),
    ("requests.exceptions.HTTPError", "502 from the gateway for employee {n}"),
]


def run_in_progress(total=120, done=90, failed_every=9, name="Salary update 2026-12"):
    """A run of ``total`` items, ``done`` of them final, every ``failed_every``th failed."""
    run = start_run(
        run_item,
        ({"n": n} for n in range(total)),
        name=name,
        initiator="hr.manager",
        on_complete=run_complete.si(label="report"),
    )
    for item in BulkRunItem.objects.filter(run=run, seq__lt=done).order_by("seq"):
        services.start_item(run.pk, item.pk, mark_run=True)
        if item.seq % failed_every == 0:
            error, message = ERRORS[item.seq % 2]
            services.finish_item(
                run.pk,
                item.pk,
                BulkRunItem.Status.FAILED,
                error_class=error,
                error_message=message.format(n=item.seq),
            )
        else:
            services.finish_item(run.pk, item.pk, BulkRunItem.Status.SUCCEEDED)
    run.refresh_from_db()
    return run


def run_staff(username, *codenames):
    """A staff user who may view runs, plus the given ``celery_guard`` permissions."""
    user = User.objects.create_user(username, password="pw", is_staff=True)
    names = ["view_bulkrun", *codenames]
    user.user_permissions.set(
        Permission.objects.filter(content_type__app_label="celery_guard", codename__in=names)
    )
    return user
