"""``manage.py celery_guard doctor`` with a live worker consuming one priority queue."""

import pytest
from django.core.management import call_command

pytestmark = pytest.mark.django_db(transaction=True)


def run_doctor(capsys):
    call_command("celery_guard", "doctor", "--timeout", "2")
    return capsys.readouterr().out


def test_doctor_reports_consumers_and_worker_command_lines(start_worker, queues, capsys):
    worker = start_worker(["high"], name="doctorhigh")
    out = run_doctor(capsys)
    assert "[ok] system checks: no issues" in out
    assert "[ok] database" in out
    assert "[ok] broker redis://" in out
    assert f"[ok] priority 'high' -> queue '{queues['high']}': {worker.name}@" in out
    assert f"[warning] priority 'low' -> queue '{queues['low']}': no worker consumes it" in out
    assert f"celery -A tests.celery_app worker -Q {queues['low']} -n {queues['low']}@%h" in out
    assert "[ok] delivery poller: alive (" in out
