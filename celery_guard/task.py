"""``GuardedTask``: the Celery task base class of guarded tasks (hook methods only)."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from celery.contrib.django.task import DjangoTask
from celery.utils import uuid

from celery_guard import conf
from celery_guard.conf import guard_settings
from celery_guard.core import headers, payload
from celery_guard.core.pipeline import Pipeline, Publish, publish_delay
from celery_guard.delivery import schedule, services
from celery_guard.delivery.step import OUTBOX
from celery_guard.exceptions import PayloadError
from celery_guard.idempotency.dedup import RunContext, context
from celery_guard.routing import router
from celery_guard.steps import GUARD

logger = logging.getLogger(__name__)


def _publish_settings() -> tuple[float | None, float | None, int]:
    """The default soft and hard time limits and the payload limit, read once per settings.

    Three setting reads on every publish cost more than the rest of the time-limit logic.
    """
    return conf.memo(
        "publish_settings",
        lambda: (
            guard_settings.soft_time_limit,
            guard_settings.time_limit,
            guard_settings.max_payload_bytes,
        ),
    )


class GuardedTask(DjangoTask):  # type: ignore[misc]
    """Base class of tasks made by :func:`celery_guard.guarded_task`.

    Subclasses Celery's ``DjangoTask`` so ``delay_on_commit`` keeps working, with the safe
    defaults for jobs that must not be lost: late acks, requeue when the worker process dies,
    and JSON only.
    """

    acks_late = True
    reject_on_worker_lost = True
    # A hard time limit requeues the message so its next delivery counts the kill as an
    # attempt (see celery_guard.failures.requests) instead of acking it away.
    acks_on_timeout = False
    serializer = "json"
    # Counts lost deliveries and hard time limit kills from the worker's main process.
    Request = "celery_guard.failures.requests:GuardedRequest"

    #: Guard options given to ``@guarded_task``, already validated.
    guard_options: ClassVar[Mapping[str, Any]] = {}
    #: The ordered feature steps every publish and every run of the task goes through.
    guard_pipeline: ClassVar[Pipeline] = GUARD

    @classmethod
    def on_bound(cls, app: Any) -> None:
        """Install the guard router into the app this task binds to."""
        super().on_bound(app)
        if not conf.configured() or guard_settings.install_router:
            router.install(app)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the body inside the guard pipeline (see ``celery_guard.steps``)."""
        return self.guard_pipeline.run(self, args, kwargs, super().__call__)

    def guard_prepare(
        self,
        args: Sequence[Any] | None,
        kwargs: Mapping[str, Any] | None,
        guard: Mapping[str, Any] | None,
        serializer: str | None = None,
        inherited: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Validate a publish before anything reaches the broker.

        Args:
            args: Positional arguments of the call.
            kwargs: Keyword arguments of the call.
            guard: Per-call guard options.
            serializer: The serializer asked for per call, if any.
            inherited: The guard header of the message being republished (a retry), whose
                decisions stand unless this call overrides them.

        Returns:
            The resolved guard fields to stamp into the message header.

        Raises:
            TypeError, ValueError: A per-call guard option is unknown or invalid.
            PayloadError: The arguments are not plain JSON or are too large.
            IdempotencyKeyError: The call's idempotency key cannot be derived.
        """
        per_call = (
            {}
            if guard is None
            else self.guard_pipeline.options.clean(
                guard, where=f"{self.name}.apply_async(guard=...)", per_call=True
            )
        )
        if serializer not in (None, "json"):
            raise ValueError(f"{self.name}: guarded tasks publish JSON, not {serializer!r}")
        try:
            payload.refuse(args, kwargs, max_bytes=_publish_settings()[2])
        except PayloadError as exc:
            logger.warning("celery_guard: refused to publish %s: %s", self.name, exc)
            raise
        if inherited:
            kept = {k: v for k, v in inherited.items() if k in self.guard_pipeline.options}
            per_call = {**kept, **per_call}
        return self.guard_pipeline.prepare(
            Publish(self, args, kwargs, per_call, inherited=inherited or {})
        )

    def apply_async(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        task_id: str | None = None,
        producer: Any = None,
        link: Any = None,
        link_error: Any = None,
        shadow: str | None = None,
        guard: Mapping[str, Any] | None = None,
        **celery_options: Any,
    ) -> Any:
        """Publish the task after the guard checks, stamping the guard header.

        A call with an idempotency key is published only if it claims its key; a duplicate
        inside the dedup window returns the ``AsyncResult`` of the first task instead.

        Args:
            guard: Per-call guard options, e.g. ``{"priority": "low"}``; they take
                precedence over the decorator's.
            **celery_options: Every option Celery's ``apply_async`` takes.

        Raises:
            IdempotencyConflict: The key is held by a call with other arguments.
        """
        soft, hard, _ = _publish_settings()
        if soft is not None or hard is not None:
            for limit, default in (("soft_time_limit", soft), ("time_limit", hard)):
                if (
                    default is not None
                    and celery_options.get(limit) is None
                    and getattr(self, limit, None) is None
                ):
                    celery_options[limit] = default
        message_headers = dict(celery_options.pop("headers", None) or {})
        previous = headers.read(message_headers)
        fields = self.guard_prepare(
            args, kwargs, guard, celery_options.get("serializer"), inherited=previous
        )
        message_headers[headers.HEADER] = headers.stamp(
            previous,
            retries=celery_options.get("retries") or 0,
            **fields,
        )
        task_id = task_id or uuid()
        countdown, eta = celery_options.get("countdown"), celery_options.get("eta")
        # The app's timezone (a proxy lookup) only matters for an ETA.
        delay = (
            0.0
            if eta is None and countdown is None
            else publish_delay(countdown, eta, self.app.timezone)
        )
        due = None
        if delay > 0 and schedule.backend_name(self.app):
            celery_options.pop("countdown", None)
            celery_options.pop("eta", None)
            due = time.time() + delay

        def send(through: Any = producer) -> Any:
            return super(GuardedTask, self).apply_async(
                args,
                kwargs,
                task_id,
                through,
                link,
                link_error,
                shadow,
                headers=message_headers,
                **celery_options,
            )

        def publish() -> Any:
            if due is None:
                return send()
            # Held in the schedule, published when due ahead of the queue's backlog, instead
            # of an ETA message a worker keeps in memory (docs/delivery.md).
            services.publish_at(
                self.app,
                due,
                send,
                {
                    "task_name": self.name,
                    "task_id": task_id,
                    "args": list(args or ()),
                    "kwargs": dict(kwargs or {}),
                    "options": celery_options,
                    "headers": message_headers,
                    "queue": str(celery_options.get("queue") or ""),
                    "attempt": int(celery_options.get("retries") or 0),
                },
            )
            return self.AsyncResult(task_id)

        return self.guard_pipeline.publish(
            self, message_headers[headers.HEADER], task_id, publish, delay
        )

    @property
    def guard(self) -> RunContext:
        """The running request's guard context (``self.guard.fencing_token``, ``.atomic()``)."""
        return context(self.request)

    def delay_on_commit(self, *args: Any, **kwargs: Any) -> None:
        """Check the arguments now, then publish when the transaction commits.

        With ``outbox=True`` the call is a row written in this transaction (see
        ``docs/delivery.md``): rolled back with it, published after the commit or, failing
        that, by the delivery poller.
        """
        self.apply_async_on_commit(args, kwargs)

    def apply_async_on_commit(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        **celery_options: Any,
    ) -> None:
        """Check the call now, then publish when the transaction commits."""
        if OUTBOX.resolve({}, self.guard_options):
            self._write_outbox(args, kwargs, celery_options)
            return
        self.guard_prepare(
            args, kwargs, celery_options.get("guard"), celery_options.get("serializer")
        )
        super().apply_async_on_commit(args, kwargs, **celery_options)

    def _write_outbox(
        self,
        args: Sequence[Any] | None,
        kwargs: Mapping[str, Any] | None,
        celery_options: dict[str, Any],
    ) -> None:
        guard = dict(celery_options.get("guard") or {})
        task_id = celery_options.get("task_id") or uuid()
        if "idempotency_key" not in guard and not self.guard_options.get("idempotency_key"):
            # The row's own identity: a second publish of the row (the fast path and the
            # poller racing, a crash after the publish) is then harmless.
            guard["idempotency_key"] = f"outbox:{task_id}"
        fields = self.guard_prepare(args, kwargs, guard, celery_options.get("serializer"))
        identity = fields.get("idempotency") or {}
        services.write_outbox(
            self,
            args,
            kwargs,
            {**celery_options, "guard": guard, "task_id": task_id},
            idempotency_key=str(identity.get("key", "")) if isinstance(identity, dict) else "",
        )
