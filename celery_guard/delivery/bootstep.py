"""The worker bootstep that runs the delivery poller inside every worker."""

from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps

from celery_guard.conf import guard_settings
from celery_guard.delivery.poller import Poller

logger = logging.getLogger(__name__)


class DeliveryPoller(bootsteps.StartStopStep):  # type: ignore[misc]
    """Starts the delivery poller thread with the worker and stops it with the worker."""

    label = "celery_guard delivery poller"
    # Started after the pool has forked its processes, so they do not inherit the thread.
    requires = ("celery.worker.components:Pool",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.poller: Poller | None = None

    def start(self, parent: Any) -> None:
        """Start polling."""
        self.poller = Poller(parent.app)
        self.poller.start()
        logger.info(
            "celery_guard: delivery poller started (schedule: %s, outbox: %s)",
            self.poller.backend,
            self.poller.outbox,
        )

    def stop(self, parent: Any) -> None:
        """Stop polling and give the lease up."""
        if self.poller is not None:
            self.poller.stop()


def install(sender: Any = None, instance: Any = None, **kwargs: Any) -> None:
    """``celeryd_init`` receiver: add the poller to the worker being built."""
    if instance is None or not guard_settings.delivery_poller:
        return
    instance.app.steps["worker"].add(DeliveryPoller)
