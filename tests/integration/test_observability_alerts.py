"""SLO alerts on the rollups: raised once after the breach held, resolved on recovery, sent to
a webhook (a local HTTP server); the checks of observability; ``celery_guard status``."""

from __future__ import annotations

import datetime as dt
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from django.core import mail
from django.core.management import call_command
from django.test import override_settings

from celery_guard.models import Alert
from celery_guard.observability import alerts, checks, rollups
from tests.support.dlq import dead_letter

pytestmark = pytest.mark.django_db(transaction=True)

QUEUE = "alerts-q"
T0 = dt.datetime(2030, 1, 1, 12, 0, tzinfo=dt.timezone.utc)


def minute(n: int, seconds: float = 0) -> dt.datetime:
    return T0 + dt.timedelta(minutes=n, seconds=seconds)


def starts(at_minute: int, lag: float, count: int = 10) -> None:
    """``count`` deliveries of a task on QUEUE that started ``lag`` seconds after publish."""
    for _ in range(count):
        rollups.add(
            "app.job", QUEUE, counter="started", lag=lag, now=minute(at_minute, 5).timestamp()
        )
        rollups.add("app.job", QUEUE, counter="succeeded", now=minute(at_minute, 6).timestamp())
    rollups.flush()


@pytest.fixture
def webhook():
    """A local HTTP server that records the JSON bodies posted to it."""
    received: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append(json.loads(body))
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/hook", received
    server.shutdown()
    server.server_close()


def test_a_lag_breach_held_raises_one_alert_and_recovery_resolves_it(webhook):
    url, received = webhook
    slos = {f"queue:{QUEUE}": {"start_within": 10, "window": 2, "hold": 3}}
    with override_settings(
        CELERY_GUARD_SLOS=slos,
        CELERY_GUARD_ALERT_WEBHOOK_URL=url,
        CELERY_GUARD_ALERT_SINKS=("log", "mail", "webhook"),
        ADMINS=[("Ops", "ops@example.com")],
    ):
        for n in range(6):
            starts(n, lag=40)  # p95 of the lag: 60 s (its bucket), objective 10 s
        first = alerts.evaluate(now=minute(1))
        assert (first.raised, first.pending) == ([], 1)  # breached, not held long enough
        assert Alert.objects.get().status == Alert.Status.PENDING
        assert received == []
        held = alerts.evaluate(now=minute(4))
        assert len(held.raised) == 1
        alert = Alert.objects.get()
        assert (alert.status, alert.slo, alert.objective) == (
            "firing",
            f"queue:{QUEUE}",
            "start_within",
        )
        assert alert.playbook.endswith("observability.html#playbook-lag")
        again = alerts.evaluate(now=minute(5))
        assert (again.raised, again.resolved) == ([], [])
        assert Alert.objects.count() == 1
        assert len(received) == 1 and len(mail.outbox) == 1
        assert received[0]["alert"]["status"] == "firing"
        assert received[0]["text"].startswith("[celery_guard ALERT]")
        assert "#playbook-lag" in received[0]["text"]
        for n in (6, 7):
            starts(n, lag=0.2)
        recovered = alerts.evaluate(now=minute(8))
        assert [a.pk for a in recovered.resolved] == [alert.pk]
        alert.refresh_from_db()
        assert alert.status == Alert.Status.RESOLVED and alert.resolved_at == minute(8)
        assert [r["alert"]["status"] for r in received] == ["firing", "resolved"]
        # A new breach later is a new incident: a second row.
        for n in range(9, 14):
            starts(n, lag=40)
        alerts.evaluate(now=minute(10))
        alerts.evaluate(now=minute(13))
        assert list(Alert.objects.values_list("status", flat=True).order_by("pk")) == [
            "resolved",
            "firing",
        ]


def test_a_breach_that_does_not_hold_leaves_no_alert():
    with override_settings(
        CELERY_GUARD_SLOS={f"queue:{QUEUE}": {"start_within": 10, "window": 2, "hold": 3}}
    ):
        starts(0, lag=40)
        alerts.evaluate(now=minute(1))
        assert Alert.objects.count() == 1
        alerts.evaluate(now=minute(5))  # no data in the window: no breach
        assert Alert.objects.count() == 0


def test_a_bulk_run_without_progress_raises_once_and_resolves_when_an_item_finishes():
    from celery_guard.runs.models import BulkRun, BulkRunItem

    slos = {"app.bulk": {"progress_within": 300, "hold": 2}}
    # A finished run whose last progress is long gone does not count.
    BulkRun.objects.create(
        task_name="app.bulk", status="succeeded", created_at=T0, finished_at=minute(0, 10)
    )
    run = BulkRun.objects.create(
        task_name="app.bulk", status="running", total=3, created_at=T0, started_at=minute(0, 1)
    )
    items = [BulkRunItem.objects.create(run=run, seq=n, task_id=f"t{n}") for n in range(3)]
    BulkRunItem.objects.filter(pk=items[0].pk).update(status="succeeded", finished_at=minute(1))
    with override_settings(CELERY_GUARD_SLOS=slos, CELERY_GUARD_ALERT_SINKS=("log",)):
        early = alerts.evaluate(now=minute(4))  # 180 s without progress: within 300
        assert early.values == {"app.bulk progress_within": 180.0}
        assert Alert.objects.count() == 0
        assert alerts.evaluate(now=minute(7)).pending == 1  # 360 s: breached, not held
        held = alerts.evaluate(now=minute(9))
        assert [(a.slo, a.objective) for a in held.raised] == [("app.bulk", "progress_within")]
        assert held.raised[0].playbook.endswith("#playbook-stalled-runs")
        assert alerts.evaluate(now=minute(10)).raised == []
        BulkRunItem.objects.filter(pk=items[1].pk).update(
            status="failed", finished_at=minute(10, 30)
        )
        recovered = alerts.evaluate(now=minute(11))
        assert [a.slo for a in recovered.resolved] == ["app.bulk"]
        assert recovered.values == {"app.bulk progress_within": 30.0}
    assert list(Alert.objects.values_list("status", flat=True)) == ["resolved"]


def test_a_beat_slot_not_fired_within_its_grace_raises_and_catching_up_resolves():
    from django_celery_beat.models import IntervalSchedule, PeriodicTask

    from celery_guard.beat.models import BeatFire

    every = IntervalSchedule.objects.create(every=1, period=IntervalSchedule.MINUTES)
    task = PeriodicTask.objects.create(
        name="obs-minutely", task="app.job", interval=every, last_run_at=minute(0)
    )
    slos = {"beat:obs-minutely": {"fire_within": 90, "window": 3, "hold": 0}}

    def fire(n: int, status: str = "fired", late: float = 2) -> None:
        BeatFire.objects.create(
            entry=task.name, slot=minute(n), status=status, token=1, fired_at=minute(n, late)
        )

    with override_settings(CELERY_GUARD_SLOS=slos, CELERY_GUARD_ALERT_SINKS=("log",)):
        on_time = alerts.evaluate(now=minute(1, 30))  # slot 1 due 30 s ago: within its grace
        assert on_time.values == {"beat:obs-minutely fire_within": 30.0}
        # No beat publishes anything: the unclaimed slot 1 is 120 s late.
        stopped = alerts.evaluate(now=minute(3))
        assert [a.objective for a in stopped.raised] == ["fire_within"]
        assert stopped.values == {"beat:obs-minutely fire_within": 120.0}
        assert alerts.evaluate(now=minute(3, 20)).raised == []
        # A beat is back: slots 1 and 2 recorded missed (catch-up), 3 and 4 fired on time.
        fire(1, "missed", late=125)
        fire(2, "missed", late=65)
        fire(3)
        fire(4)
        PeriodicTask.objects.filter(pk=task.pk).update(last_run_at=minute(4))
        # The missed slot 1 is still in the window: still breached, nothing new raised.
        assert alerts.evaluate(now=minute(3, 50)).raised == []
        assert Alert.objects.get().status == Alert.Status.FIRING
        recovered = alerts.evaluate(now=minute(4, 30))
        assert len(recovered.resolved) == 1
        assert recovered.values == {"beat:obs-minutely fire_within": 65.0}
        # A publish that failed stays late until now.
        fire(5, "failed")
        PeriodicTask.objects.filter(pk=task.pk).update(last_run_at=minute(5))
        assert alerts.evaluate(now=minute(6, 40)).values == {"beat:obs-minutely fire_within": 100.0}
    with override_settings(CELERY_GUARD_SLOS={"beat:nobody": {"fire_within": 60}}):
        assert alerts.evaluate(now=minute(7)).values == {"beat:nobody fire_within": None}


def test_e010_malformed_slos_and_sinks():
    with override_settings(CELERY_GUARD_SLOS={"queue:q": {"start_in": 5}}):
        messages = checks.check_slos()
    assert [m.id for m in messages] == ["celery_guard.E010", "celery_guard.E010"]
    assert "unknown objective 'start_in'" in " ".join(m.msg for m in messages)
    with override_settings(
        CELERY_GUARD_SLOS={"t": {"success_share": 2}}, CELERY_GUARD_ALERT_SINKS=("pager",)
    ):
        assert [m.id for m in checks.check_slos()] == ["celery_guard.E010"] * 2
    with override_settings(CELERY_GUARD_SLOS={"t": {"success_share": 0.99, "hold": 2}}):
        assert checks.check_slos() == []
    wrong = {
        "queue:q": {"progress_within": 60},
        "beat:nightly": {"start_within": 60},
        "t": {"fire_within": 60, "start_within": float("nan")},
        "u": {"dlq_per_hour": float("inf"), "window": 0},
        "v": {"start_within": -1, "hold": "5"},
    }
    with override_settings(CELERY_GUARD_SLOS=wrong):
        texts = [m.msg for m in checks.check_slos()]
    assert len(texts) == 8, texts
    assert "'progress_within' does not apply to this key" in texts[0]
    assert "'start_within' does not apply to this key (it takes: fire_within)" in texts[1]
    assert "'fire_within' does not apply" in texts[2]
    assert "['start_within'] must be a finite number of seconds" in texts[3]
    assert "['dlq_per_hour'] must be a finite number >= 0" in texts[4]
    assert "['window'] must be a positive number of minutes" in texts[5]
    assert "['start_within'] must be a positive number of seconds" in texts[6]
    assert "['hold'] expected minutes (number), got str" in texts[7]
    good = {
        "t": {"start_within": dt.timedelta(seconds=30), "progress_within": 600, "hold": 0},
        "beat:nightly": {"fire_within": 120},
    }
    with override_settings(CELERY_GUARD_SLOS=good):
        assert checks.check_slos() == []


def test_observability_settings_are_e001():
    with override_settings(
        CELERY_GUARD_ROLLUP_FLUSH_SECONDS=float("nan"),
        CELERY_GUARD_ROLLUP_RETENTION_DAYS=0.5,
        CELERY_GUARD_ALERT_WEBHOOK_URL="file:///etc/passwd",
    ):
        texts = [m.msg for m in checks.check_setting_values() if m.id == "celery_guard.E001"]
        assert alerts.guard_settings.alert_webhook_url is None  # never opened
    assert len(texts) == 3, texts
    assert texts[0].startswith("CELERY_GUARD_ROLLUP_FLUSH_SECONDS: must be a finite number")
    assert texts[1].startswith("CELERY_GUARD_ROLLUP_RETENTION_DAYS: must be at least 1 day")
    assert "ALERT_WEBHOOK_URL must be an http:// or https:// URL" in texts[2]
    with override_settings(
        CELERY_GUARD_ROLLUP_FLUSH_SECONDS=dt.timedelta(0),
        CELERY_GUARD_ALERT_WEBHOOK_URL="https://hooks.example/x",
    ):
        assert checks.check_setting_values() == []


def test_purge_deletes_rollups_older_than_the_retention(settings, capsys):
    from django.core.management.base import CommandError
    from django.utils import timezone

    from celery_guard.observability.models import TaskMinute

    now = timezone.now().timestamp()
    for days in (20, 15, 13, 0):
        rollups.add("app.job", QUEUE, counter="succeeded", now=now - days * 86400)
    rollups.flush()
    call_command("celery_guard", "purge")
    assert "purged 2 rollup row(s)" in capsys.readouterr().out
    assert TaskMinute.objects.count() == 2
    settings.CELERY_GUARD_ROLLUP_RETENTION_DAYS = 0.5
    with pytest.raises(CommandError, match="ROLLUP_RETENTION_DAYS: must be at least 1 day"):
        call_command("celery_guard", "purge")
    assert TaskMinute.objects.count() == 2  # refused before anything was purged
    settings.CELERY_GUARD_ROLLUP_RETENTION_DAYS = 1
    call_command("celery_guard", "purge")
    assert list(TaskMinute.objects.values_list("succeeded", flat=True)) == [1]


@override_settings(CELERY_GUARD_METRICS=True)
def test_w018_metrics_without_a_multiprocess_directory(monkeypatch):
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    assert [m.id for m in checks.check_multiprocess()] == ["celery_guard.W018"]
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "/tmp/somewhere")
    assert checks.check_multiprocess() == []
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR")
    with override_settings(CELERY_GUARD_METRICS=False):
        assert checks.check_multiprocess() == []


def test_w019_slos_without_rollups():
    with override_settings(
        CELERY_GUARD_SLOS={"t": {"success_share": 0.9}}, CELERY_GUARD_ROLLUPS=False
    ):
        assert [m.id for m in checks.check_rollups()] == ["celery_guard.W019"]
    with override_settings(CELERY_GUARD_SLOS={"t": {"success_share": 0.9}}):
        assert checks.check_rollups() == []


def test_status_command_reports_queues_dead_letters_and_alerts(capsys, settings, empty_queues):
    queue = settings.CELERY_GUARD_PRIORITY_QUEUES["default"]
    dead_letter("status-1")
    dead_letter("status-2")
    now = dt.datetime.now(dt.timezone.utc).timestamp()
    for _ in range(3):
        rollups.add("app.job", queue, counter="started", lag=0.5, now=now)
        rollups.add("app.job", queue, counter="succeeded", now=now)
    rollups.add("app.job", queue, counter="retried", now=now)
    rollups.flush()
    call_command("celery_guard", "status", "--json")
    data = json.loads(capsys.readouterr().out)
    row = next(q for q in data["queues"] if q["queue"] == queue)
    assert (row["depth"], row["throughput"], row["dead_letters"]) == (0, 3, 2)
    assert row["failure_share"] == 0.25 and row["health"] == "amber"
    assert sum(row["per_minute"]) == 3
    assert [d["count"] for d in data["dead_letters"]] == [2]
    call_command("celery_guard", "status")
    table = capsys.readouterr().out
    assert queue in table and "amber" in table and "Dead letters (open) by task" in table


def test_w027_an_slo_window_longer_than_the_rollup_retention():
    slos = {"app.job": {"success_share": 0.9, "window": 3 * 24 * 60}}
    with override_settings(CELERY_GUARD_SLOS=slos, CELERY_GUARD_ROLLUP_RETENTION_DAYS=2):
        [message] = checks.check_retention()
    assert message.id == "celery_guard.W027"
    assert "window of 4320 minutes" in message.msg and "keeps 2 days" in message.msg
    with override_settings(CELERY_GUARD_SLOS=slos, CELERY_GUARD_ROLLUP_RETENTION_DAYS=3):
        assert checks.check_retention() == []
