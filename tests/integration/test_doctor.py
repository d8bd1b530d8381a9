"""``manage.py celery_guard doctor`` against the real broker and database (no worker)."""

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

pytestmark = pytest.mark.django_db(transaction=True)


def run_doctor(capsys):
    call_command("celery_guard", "doctor", "--timeout", "2")
    return capsys.readouterr().out


def test_doctor_fails_when_the_broker_is_unreachable(celery_conf, capsys):
    celery_conf(broker_url="redis://127.0.0.1:1/0", broker_write_url=None)
    with pytest.raises(CommandError, match="doctor found errors"):
        run_doctor(capsys)
    assert "[error] broker redis://" in capsys.readouterr().out


def test_doctor_fails_on_a_check_error(settings, capsys):
    settings.CELERY_GUARD_MAX_PAYLOAD_BYTES = 0
    with pytest.raises(CommandError):
        run_doctor(capsys)
    assert "[error] celery_guard.E001" in capsys.readouterr().out


def test_doctor_reports_the_limits_store_and_paused_task_types(settings, capsys):
    from celery_guard.limits import services, store

    services.set_paused("app.tasks.notify", True)
    settings.CELERY_GUARD_LIMITS_REDIS_URL = "redis://127.0.0.1:1/0"
    store._paused_until = 0.0
    with pytest.raises(CommandError):
        run_doctor(capsys)
    out = capsys.readouterr().out
    assert "[error] limits store: unreachable" in out
    assert "[warning] task types paused (deferred until resumed): app.tasks.notify" in out
    store._paused_until = 0.0


def test_doctor_reaches_the_database_limits_store(settings, capsys):
    settings.CELERY_GUARD_LIMITS_BACKEND = "database"
    try:
        out = run_doctor(capsys)
    except CommandError:  # other findings (no worker consumes the queues) do not matter here
        out = capsys.readouterr().out
    assert "[ok] limits store: reachable (database," in out
