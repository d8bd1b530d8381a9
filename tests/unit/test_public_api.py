"""Every public path listed in docs/api.md imports and is what it says."""

from __future__ import annotations

import importlib

import pytest
from celery import current_app
from celery.utils.imports import symbol_by_name
from django.db import models as django_models
from django.dispatch import Signal

import celery_guard

EXCEPTIONS = (
    "GuardError",
    "PayloadError",
    "TransientError",
    "ThrottledError",
    "PermanentError",
    "PoisonMessageError",
    "InvalidHeaderError",
    "RepublishError",
    "HardTimeLimitError",
    "IdempotencyKeyError",
    "IdempotencyConflict",
    "LeaseLost",
)
MODELS = (
    "DeadLetter",
    "DeadLetterReplay",
    "IdempotencyRecord",
    "BeatLease",
    "BeatFire",
    "Delivery",
)


def test_the_decorator_and_the_task_class():
    from celery_guard.task import GuardedTask

    assert callable(celery_guard.guarded_task)
    assert celery_guard.GuardedTask is GuardedTask


@pytest.mark.parametrize("name", EXCEPTIONS)
def test_every_exception_at_the_top_and_in_exceptions(name):
    from celery_guard import exceptions

    cls = getattr(celery_guard, name)
    assert cls is getattr(exceptions, name) and issubclass(cls, Exception)


def test_backoff_policies():
    from celery_guard.backoff import Exponential, Fixed, Schedule, parse

    assert parse(3) == Fixed(3)
    assert isinstance(parse(Exponential()), Exponential)
    assert isinstance(parse((1, 2)), Schedule)


@pytest.mark.parametrize("name", ["dead_lettered", "lease_acquired", "lease_lost"])
def test_signals(name):
    assert isinstance(getattr(importlib.import_module("celery_guard.signals"), name), Signal)


@pytest.mark.parametrize("name", MODELS)
def test_models_keep_their_app_label_and_table(name):
    model = getattr(importlib.import_module("celery_guard.models"), name)
    assert issubclass(model, django_models.Model)
    assert model._meta.app_label == "celery_guard"
    assert model._meta.db_table == f"celery_guard_{name.lower()}"


def test_paths_stored_in_settings():
    from celery_guard.beat.scheduler import GuardedScheduler
    from celery_guard.routing.router import route_task

    assert symbol_by_name("celery_guard.beat:GuardedScheduler") is GuardedScheduler
    assert symbol_by_name("celery_guard.routing.route_task") is route_task
    importlib.import_module("celery_guard.tasks")
    assert "celery_guard.purge_idempotency_records" in current_app.tasks


def test_release_of_a_key():
    from celery_guard.idempotency import release
    from celery_guard.idempotency.dedup import release as implementation

    assert release is implementation
