"""Worker database connections with the package defaults: kept across tasks, replaced if dead.

The suite's settings set no ``CELERY_DB_REUSE_MAX`` (the README's quick start sets none).
"""

import uuid

import pytest
from django.db import connection

from celery_guard.models import DeadLetter
from tests.support.harness import wait_until
from tests.testapp import idem_tasks
from tests.testapp.models import Execution

pytestmark = pytest.mark.django_db(transaction=True)


def backends(name):
    with connection.cursor() as cursor:
        cursor.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s", [name])
        return {pid for (pid,) in cursor.fetchall()}


def notify(version):
    idem_tasks.idem_notify.delay(7, version)
    label = f"notify:7:{version}:"
    return wait_until(lambda: Execution.objects.filter(label__startswith=label).first(), 30)


def test_a_dead_connection_is_replaced_and_a_live_one_kept(start_worker, postgres):
    name = f"cg-worker-{uuid.uuid4().hex[:8]}"
    start_worker(["high"], extra_env={"CG_DB_APPLICATION_NAME": name})
    notify("a")  # the database ledger: claim at enqueue, start and finish in the worker
    first = backends(name)
    assert first  # kept open after the task, not closed by Celery's Django fixup
    notify("b")
    assert backends(name) == first  # and used again by the next task

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            [name],
        )
    wait_until(lambda: not backends(name), 10)
    # The first task after the kill may fail on the dead connection (a transient error,
    # retried); the connection is replaced after it, so the retry and later tasks run.
    notify("c")
    notify("d")
    assert not backends(name) & first
    assert not DeadLetter.objects.exists()
