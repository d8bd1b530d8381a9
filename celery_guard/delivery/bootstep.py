"""The worker bootsteps of delivery: the poller thread, and the due queues on AMQP brokers."""

from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps

from celery_guard.conf import guard_settings
from celery_guard.delivery import schedule
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


class DueQueues(bootsteps.StartStopStep):  # type: ignore[misc]
    """Consumer step: also consume the due queue of every queue this worker consumes (AMQP).

    RabbitMQ cannot put a message at the head of a queue. The database schedule publishes a
    due message to ``<queue>.cg-due`` instead (when that queue has consumers, see
    ``schedule.DueQueues``), which this step has every worker consume: its own consumer, with
    its own prefetch window (RabbitMQ applies ``basic.qos`` per consumer), so the message is
    delivered at once, ahead of the backlog of ``<queue>``. Workers are started as before
    (``-Q default``): the due queues are added here, not named by users.
    """

    label = "celery_guard due queues"
    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, c: Any) -> None:
        """Consume the due queues (again after a reconnection: the set is rebuilt)."""
        if not schedule.is_amqp(c.app) or schedule.backend_name(c.app) != "database":
            return
        queues = c.app.amqp.queues
        for name in list(queues.consume_from):
            if name.endswith(schedule.DUE_QUEUE_SUFFIX):
                continue
            due = queues.select_add(schedule.due_queue(name))
            if not any(q.name == due.name for q in c.task_consumer.queues):
                # Consumed with the others when the event loop starts consuming.
                c.task_consumer.add_queue(due)
                logger.info("celery_guard: consuming due queue %s", due.name)


def install(sender: Any = None, instance: Any = None, **kwargs: Any) -> None:
    """``celeryd_init`` receiver: add the poller and the due queues to the worker being built."""
    if instance is None:
        return
    instance.app.steps["consumer"].add(DueQueues)
    if guard_settings.delivery_poller:
        instance.app.steps["worker"].add(DeliveryPoller)
