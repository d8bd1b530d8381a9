"""Task policies: a task type's run-time pause and limit overrides, edited in the admin."""

from __future__ import annotations

from django.core.exceptions import ValidationError
from django.db import models

from celery_guard.conf import guard_settings
from celery_guard.limits import rules


def _validate_priority(value: str) -> None:
    levels = guard_settings.priority_queues
    if value and value not in levels:
        raise ValidationError(
            f"{value!r} is not a priority level; CELERY_GUARD_PRIORITY_QUEUES defines "
            f"{', '.join(repr(level) for level in levels)}"
        )


def _validate_rate(value: str) -> None:
    try:
        rules.parse_rate(value)
    except (TypeError, ValueError) as exc:
        raise ValidationError(str(exc)) from None


class TaskPolicy(models.Model):
    """One task type's policy, read by every worker within ``CELERY_GUARD_POLICY_REFRESH``.

    A paused task type's deliveries are deferred (republished later, no attempt used), not
    dropped; the overrides replace the task's own ``concurrency``/``rate``/``priority``
    options (a priority override also moves deliveries already queued, see ``docs/limits.md``).
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
    priority = models.CharField(
        max_length=64,
        blank=True,
        validators=[_validate_priority],
        help_text="overrides the task's priority level (a key of CELERY_GUARD_PRIORITY_QUEUES), "
        "also of its calls' guard={'priority': ...}; deliveries already queued move when a "
        "worker takes them",
    )
    note = models.TextField(blank=True, help_text="why (an incident, a ticket...)")
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name = "task policy"
        verbose_name_plural = "task policies"
        ordering = ["task_name"]

    def __str__(self) -> str:
        return f"{self.task_name}{' (paused)' if self.paused else ''}"


class LimitScope(models.Model):
    """One rule's scope in the database limits store: the row an admission locks.

    Admissions of runs that share a scope are serialised on this row (``SELECT ... FOR
    UPDATE`` on PostgreSQL, in scope order; SQLite serialises every write anyway). It also
    holds the scope's back-off (a gateway's 429 ``Retry-After``). Written only by
    :mod:`celery_guard.limits.dbstore`.
    """

    scope = models.CharField(max_length=255, unique=True)
    #: Epoch seconds (the database server's clock on PostgreSQL) until which nothing is
    #: admitted under this scope; 0: no back-off.
    backoff_until = models.FloatField(default=0.0)

    class Meta:
        verbose_name = "limit scope"

    def __str__(self) -> str:
        return self.scope


class LimitEntry(models.Model):
    """A held concurrency slot (a lease) or a recorded start (a rate's sliding log).

    Live while ``until`` is in the future: a lease until its expiry (pushed on by renewals),
    a start until it leaves its rate's window (start + period). Expired rows count for
    nothing and are purged. Written only by :mod:`celery_guard.limits.dbstore`.
    """

    class Kind(models.TextChoices):
        SLOT = "c", "concurrency slot"
        START = "r", "rate start"

    scope = models.CharField(max_length=255)
    kind = models.CharField(max_length=1, choices=Kind.choices)
    holder = models.CharField(max_length=64)
    #: Epoch seconds (the database server's clock on PostgreSQL) when the entry stops counting.
    until = models.FloatField()

    class Meta:
        verbose_name = "limit entry"
        verbose_name_plural = "limit entries"
        indexes = [
            models.Index(fields=["scope", "until"], name="cg_limitentry_scope_until"),
            models.Index(fields=["holder"], name="cg_limitentry_holder"),
        ]

    def __str__(self) -> str:
        return f"{self.scope} {self.kind} {self.holder}"
