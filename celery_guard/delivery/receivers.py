"""Receivers of the delivery feature: the poller joins every worker."""

from __future__ import annotations

from celery import signals

from celery_guard.delivery import bootstep


def connect() -> None:
    """Add the delivery poller to every worker started after this."""
    signals.celeryd_init.connect(bootstep.install, dispatch_uid="celery_guard.delivery.install")
