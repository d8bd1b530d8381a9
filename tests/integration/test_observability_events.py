"""Which events a delivery emits, run through Celery's tracer on the real database ledger."""

from __future__ import annotations

import pytest

from celery_guard.observability import events
from tests.testapp.idem_tasks import idem_atomic

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def seen():
    """Every event emitted while the test runs: (name, task id, where)."""
    found: list[tuple[str, str | None, str | None]] = []
    events.subscribe(lambda e, f: found.append((e.name, f.get("task_id"), f.get("where"))), uid="t")
    yield found
    events.unsubscribe("t")


def test_started_comes_only_for_a_delivery_that_passed_the_gates(seen):
    first = idem_atomic.apply(("events-once",))
    assert first.successful(), first.traceback
    again = idem_atomic.apply(("events-once",))  # the key already succeeded: skipped at run
    assert again.successful(), again.traceback
    assert seen == [
        ("started", first.id, None),
        ("succeeded", first.id, None),
        ("deduplicated", again.id, "run"),
    ]


def test_outcomes_are_written_once_the_flush_interval_has_passed(settings):
    from celery_guard.observability import rollups
    from celery_guard.observability.models import TaskMinute

    fields = {"task_name": "app.flushed", "queue": "q", "duration": 0.01}
    rollups.flush()  # the interval is read again from here on
    settings.CELERY_GUARD_ROLLUP_FLUSH_SECONDS = 3600
    rollups.record(events.CATALOGUE["succeeded"], fields)
    rollups.record(events.CATALOGUE["succeeded"], fields)
    assert not TaskMinute.objects.filter(task_name="app.flushed").exists()  # buffered
    rollups.flush()
    settings.CELERY_GUARD_ROLLUP_FLUSH_SECONDS = 0
    rollups.record(events.CATALOGUE["succeeded"], fields)  # due at once: written
    assert TaskMinute.objects.get(task_name="app.flushed").succeeded == 3
