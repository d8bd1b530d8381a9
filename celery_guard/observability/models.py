"""Per-minute rollups of the events (dashboard, status, SLOs) and the alerts they raise."""

from __future__ import annotations

from django.db import models

#: Upper bounds (seconds) of the lag buckets of a rollup; a last bucket holds the rest.
LAG_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 300.0, 900.0, 3600.0)


class TaskMinute(models.Model):
    """Counts of one task on one queue in one minute, written in batches by each process."""

    minute = models.DateTimeField(help_text="start of the minute (UTC)")
    task_name = models.CharField(max_length=200)
    queue = models.CharField(max_length=200, blank=True)
    started = models.PositiveIntegerField(default=0)
    succeeded = models.PositiveIntegerField(default=0)
    retried = models.PositiveIntegerField(default=0)
    dead_lettered = models.PositiveIntegerField(default=0)
    deduplicated = models.PositiveIntegerField(default=0)
    deferred = models.PositiveIntegerField(default=0)
    lag_count = models.PositiveIntegerField(default=0)
    lag_sum = models.FloatField(default=0)
    lag_max = models.FloatField(default=0)
    #: One count per bucket of :data:`LAG_BUCKETS`, plus one for longer lags.
    lag_buckets = models.JSONField(default=list)
    duration_sum = models.FloatField(default=0)

    class Meta:
        verbose_name = "task minute"
        constraints = [
            models.UniqueConstraint(
                fields=["minute", "task_name", "queue"], name="celery_guard_taskminute_unique"
            )
        ]
        indexes = [models.Index(fields=["minute"], name="celery_guard_taskminute_min")]

    def __str__(self) -> str:
        return f"{self.task_name} on {self.queue or '?'} at {self.minute:%Y-%m-%d %H:%M}"


class AlertStatus(models.TextChoices):
    """An alert's life: breached but not yet held long enough, raised, resolved."""

    PENDING = "pending", "pending (breach not held long enough yet)"
    FIRING = "firing", "firing"
    RESOLVED = "resolved", "resolved"


#: Statuses of an incident still going on: at most one such alert per SLO objective.
OPEN_ALERT_STATUSES = (AlertStatus.PENDING, AlertStatus.FIRING)


class Alert(models.Model):
    """One incident of one SLO objective: raised once when its breach held, then resolved."""

    Status = AlertStatus

    slo = models.CharField(max_length=200, help_text='task name or "queue:<name>"')
    objective = models.CharField(max_length=64)
    status = models.CharField(max_length=16, choices=AlertStatus.choices)
    value = models.FloatField(null=True, blank=True, help_text="the last value measured")
    threshold = models.FloatField()
    breached_at = models.DateTimeField(help_text="first evaluation that saw the breach")
    raised_at = models.DateTimeField(null=True, blank=True)
    resolved_at = models.DateTimeField(null=True, blank=True)
    message = models.TextField(blank=True)
    playbook = models.URLField(max_length=500, blank=True)

    class Meta:
        verbose_name = "alert"
        ordering = ["-breached_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["slo", "objective"],
                condition=models.Q(status__in=["pending", "firing"]),
                name="celery_guard_alert_one_open",
            )
        ]

    def __str__(self) -> str:
        return f"{self.slo} {self.objective}: {self.status}"


class Dashboard(models.Model):
    """No table: gives the admin dashboard its URL and its own ``view_dashboard`` permission."""

    class Meta:
        managed = False
        verbose_name = "dashboard"
        verbose_name_plural = "dashboard"
        default_permissions = ("view",)

    def __str__(self) -> str:
        return "dashboard"
