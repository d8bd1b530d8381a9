"""What the demo tasks record, so the demo can show when and where each job ran."""

from django.db import models


class JobRun(models.Model):
    """One execution of a demo task."""

    label = models.CharField(max_length=100)
    priority = models.CharField(max_length=20)
    queue = models.CharField(max_length=100)
    worker = models.CharField(max_length=200)
    started_at = models.DateTimeField()
    finished_at = models.DateTimeField()

    class Meta:
        ordering = ["started_at"]

    def __str__(self) -> str:
        return f"{self.label} on {self.queue}"
