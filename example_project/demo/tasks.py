"""Demo tasks: a high-priority password reset and a low-priority report."""

import time

from django.utils import timezone

from celery_guard import guarded_task
from demo.models import JobRun


def _record(task, label: str, seconds: float) -> None:
    started = timezone.now()
    time.sleep(seconds)
    JobRun.objects.create(
        label=label,
        priority=task.request.headers["celery_guard"]["priority"],
        queue=task.request.delivery_info.get("routing_key", ""),
        worker=task.request.hostname,
        started_at=started,
        finished_at=timezone.now(),
    )


@guarded_task(priority="high", bind=True)
def send_password_reset(self, user_id: int) -> None:
    """Pretend to send a password-reset mail: urgent, a user is waiting."""
    _record(self, f"password reset for user {user_id}", 0.05)


@guarded_task(priority="low", bind=True)
def build_report(self, report_id: int) -> None:
    """Pretend to build a report: slow, nobody is waiting."""
    _record(self, f"report {report_id}", 0.2)
