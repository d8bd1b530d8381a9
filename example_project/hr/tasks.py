"""The HR scenario's guarded tasks: notify an employee, send a password reset, recalc a report.

``notify_employee`` is the bulk run's item task, ``recalc_report`` its completion and
``send_password_reset`` the urgent mail that must overtake the bulk work. The mail goes
through the gateway at ``MAIL_GATEWAY_URL`` (``make demo`` starts a simulated one).
"""

import os
from collections import Counter

from django.db.models import F
from django.utils import timezone

from celery_guard import guarded_task, runs
from celery_guard.backoff import Exponential
from hr import gateway
from hr.models import Employee, Notification, PasswordReset, ReportRecalc

# --- The mail gateway's shared rate limit: the ONE place to change. ---------------------
# The cluster-wide named limit "mail-gateway" (CELERY_GUARD_LIMITS in proj/settings.py,
# docs/limits.md): every worker together stays under the gateway's rate, and a delivery over
# it is deferred instead of holding a worker slot. `make demo` sets MAIL_GATEWAY_RATE from
# DEMO_SIZE; the gateway bears 1.3 times that.
MAIL_GATEWAY_LIMIT = {"limits": ["mail-gateway"]}


def _gateway_url() -> str:
    return os.environ.get("MAIL_GATEWAY_URL", "http://127.0.0.1:8025")


@guarded_task(
    bind=True,
    priority="low",
    idempotency_key="notify:{employee_id}:{event_version}",
    max_attempts=8,
    backoff=Exponential(base=0.5, factor=2, cap=5),
    **MAIL_GATEWAY_LIMIT,
)
def notify_employee(self, employee_id: int, event_version: str) -> None:
    """Tell one employee about the update: one mail, recorded once.

    The gateway call carries the idempotency key, so a retry after a timeout (or a
    redelivery after a crash) that reaches the gateway again is answered without a second
    mail; the notification row commits with the key (``self.guard.atomic()``).
    """
    employee = Employee.objects.get(pk=employee_id)
    message_id = gateway.send(
        _gateway_url(),
        template="salary-update",
        recipient_id=employee.pk,
        to=employee.email,
        key=self.guard.key or "",
    )
    with self.guard.atomic():
        Notification.objects.create(
            employee=employee,
            event_version=event_version,
            gateway_message_id=message_id,
            fencing_token=self.guard.fencing_token,
        )


@guarded_task(
    bind=True,
    priority="high",
    idempotency_key="reset:{reset_id}",
    max_attempts=8,
    backoff=Exponential(base=0.2, factor=2, cap=2),
)
def send_password_reset(self, reset_id: int) -> None:
    """Send a password-reset mail: a user is waiting for it."""
    PasswordReset.objects.filter(pk=reset_id, started_at=None).update(started_at=timezone.now())
    reset = PasswordReset.objects.select_related("employee").get(pk=reset_id)
    gateway.send(
        _gateway_url(),
        template="password-reset",
        recipient_id=reset.employee_id,
        to=reset.employee.email,
        key=self.guard.key or "",
    )
    with self.guard.atomic():
        PasswordReset.objects.filter(pk=reset_id).update(sent_at=timezone.now())


@guarded_task(bind=True, priority="default", max_attempts=5, backoff=1)
def recalc_report(self, event_version: str) -> None:
    """The run's completion: recalculate the salary report once, from the run's summary."""
    summary = runs.summary(self) or {}
    notified = Counter(
        Notification.objects.filter(event_version=event_version)
        .annotate(department=F("employee__department"))
        .values_list("department", flat=True)
    )
    with self.guard.atomic():
        ReportRecalc.objects.create(
            run_id=int(summary.get("run") or 0),
            event_version=event_version,
            status=str(summary.get("status", "")),
            notified=sum(notified.values()),
            by_department=dict(notified),
        )
