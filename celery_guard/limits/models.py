"""Task policies: a task type's run-time pause and limit overrides, edited in the admin."""

from __future__ import annotations

from django.core.exceptions import ValidationError
from django.db import models

from celery_guard.limits import rules


def _validate_rate(value: str) -> None:
    try:
        rules.parse_rate(value)
    except (TypeError, ValueError) as exc:
        raise ValidationError(str(exc)) from None


class TaskPolicy(models.Model):
    """One task type's policy, read by every worker within ``CELERY_GUARD_POLICY_REFRESH``.

    A paused task type's deliveries are deferred (republished later, no attempt used), not
    dropped; the overrides replace the task's own ``concurrency``/``rate`` options.
    """

    task_name = models.CharField(max_length=200, unique=True)
    paused = models.BooleanField(
        default=False, help_text="deliveries are deferred until the task type is resumed"
    )
    concurrency = models.PositiveIntegerField(
        null=True,
        blank=True,
        help_text="overrides the task's concurrency option (bodies at once, cluster-wide)",
    )
    rate = models.CharField(
        max_length=32,
        blank=True,
        validators=[_validate_rate],
        help_text="overrides the task's rate option: 'N/s', 'N/m' or 'N/h'",
    )
    note = models.TextField(blank=True, help_text="why (an incident, a ticket...)")
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name = "task policy"
        verbose_name_plural = "task policies"
        ordering = ["task_name"]

    def __str__(self) -> str:
        return f"{self.task_name}{' (paused)' if self.paused else ''}"
