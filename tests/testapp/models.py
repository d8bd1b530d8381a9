"""Records written by the test tasks on real workers."""

from django.db import models


class Execution(models.Model):
    """One run of a test task body (no unique constraint: duplicates must be countable)."""

    task = models.CharField(max_length=200)
    label = models.CharField(max_length=200)
    queue = models.CharField(max_length=200)
    hostname = models.CharField(max_length=200)
    guard_header = models.JSONField(null=True)
    started_at = models.FloatField()
    finished_at = models.FloatField()

    def __str__(self) -> str:
        return f"{self.task}({self.label})"
