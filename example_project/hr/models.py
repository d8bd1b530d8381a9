"""Employees, the notifications and password resets sent to them, the recalculated report."""

from django.db import models


class Employee(models.Model):
    """An employee record that the HR bulk update touches."""

    name = models.CharField(max_length=100)
    email = models.CharField(max_length=200)
    department = models.CharField(max_length=50, db_index=True)
    salary = models.PositiveIntegerField(default=0)

    def __str__(self) -> str:
        return f"{self.name} <{self.email}>"


class Notification(models.Model):
    """One notification mail accepted by the gateway, written in the key's transaction."""

    employee = models.ForeignKey(Employee, on_delete=models.CASCADE)
    event_version = models.CharField(max_length=50)
    gateway_message_id = models.CharField(max_length=64)
    fencing_token = models.PositiveIntegerField(null=True)
    sent_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        # A second row for one employee and event would be a double notification.
        constraints = [
            models.UniqueConstraint(
                fields=["employee", "event_version"], name="hr_one_notification_per_event"
            )
        ]

    def __str__(self) -> str:
        return f"{self.event_version} to {self.employee_id}"


class PasswordReset(models.Model):
    """A password-reset request: a user waits for this mail."""

    employee = models.ForeignKey(Employee, on_delete=models.CASCADE)
    requested_at = models.DateTimeField()
    started_at = models.DateTimeField(null=True)
    sent_at = models.DateTimeField(null=True)

    def __str__(self) -> str:
        return f"password reset {self.pk} for {self.employee_id}"


class ReportRecalc(models.Model):
    """One recalculation of the salary report, by a run's completion."""

    run_id = models.PositiveIntegerField(db_index=True)
    event_version = models.CharField(max_length=50)
    status = models.CharField(max_length=30)
    notified = models.PositiveIntegerField()
    by_department = models.JSONField(default=dict)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"report of run {self.run_id} ({self.status})"
