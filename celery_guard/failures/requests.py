"""``GuardedRequest``: the worker main process's side of a guarded delivery (lost, killed).

Celery's documented extension point for handlers that must run in the main process (a task's
``Request`` class): a pool child that dies, or is killed at the hard time limit, cannot record
anything itself. The record is written before Celery requeues the message, so the redelivery
sees it on whichever worker it lands.
"""

from __future__ import annotations

from typing import Any

from billiard.einfo import ExceptionWithTraceback  # type: ignore[import-untyped]
from celery.exceptions import WorkerLostError
from celery.worker import state
from celery.worker.request import Request

from celery_guard.failures import handler


def _lost(exc: BaseException) -> bool:
    if isinstance(exc, ExceptionWithTraceback):
        exc = exc.exc
    # Billiard >= 4.3 reports a child's exit as SystemExit before Celery turns it into
    # WorkerLostError; a child Celery stopped itself is not requeued, so never counted.
    return isinstance(exc, (WorkerLostError, SystemExit, KeyboardInterrupt))


class GuardedRequest(Request):  # type: ignore[misc]
    """The ``Request`` of guarded tasks: counts lost deliveries and hard time limit kills."""

    _guard_lost = False

    def _guard_identity(self) -> tuple[str, str, int, str]:
        retries = self.request_dict.get("retries") or 0
        return self.task_name, self.task_id, int(retries), self.hostname or ""

    def on_timeout(self, soft: bool, timeout: float) -> None:
        """Note a hard time limit kill before Celery requeues the message."""
        if not soft and not state.should_terminate:
            handler.on_hard_timeout(*self._guard_identity())
        super().on_timeout(soft, timeout)

    def on_failure(
        self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False
    ) -> None:
        """Remember a lost worker process for :meth:`reject`, which requeues the message."""
        self._guard_lost = _lost(exc_info.exception)
        super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)

    def reject(self, requeue: bool = False) -> None:
        """Count a lost delivery right before its message goes back to the queue."""
        if requeue and self._guard_lost and not self.acknowledged:
            handler.on_worker_lost(*self._guard_identity())
        super().reject(requeue=requeue)
