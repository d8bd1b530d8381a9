"""Registers the bulk runs' figures with observability (the SLO evaluator's stalled runs)."""

from __future__ import annotations

from celery_guard.observability import providers
from celery_guard.runs import services


def connect() -> None:
    """Register the readers; registering again replaces them."""
    providers.register("run_stall", services.stall)
