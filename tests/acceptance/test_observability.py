"""Observability on real workers: request ids in the worker's logs, Prometheus under prefork
(with replaced pool processes), queue depth and oldest age from Redis, Sentry events."""

from __future__ import annotations

import datetime as dt
import json
import uuid

import pytest
from django.conf import settings
from django.contrib.auth.models import User
from prometheus_client.parser import text_string_to_metric_families

from celery_guard.models import DeadLetter
from tests.support.harness import wait_until
from tests.support.sentry_transport import checkins as sentry_checkins
from tests.support.sentry_transport import events as sentry_events
from tests.testapp.models import Execution
from tests.testapp.obs_tasks import obs_doomed_job, obs_flaky_job, obs_timed_job

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("postgres", "empty_queues"),
]


def log_records(worker) -> list[dict]:
    """The JSON records of the guard in a worker's log (CG_JSON_LOGS)."""
    found = []
    for line in worker.log_path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                found.append(json.loads(line))
            except ValueError:
                continue
    return found


def test_a_request_id_follows_the_click_into_the_worker_and_its_child_tasks(client, start_worker):
    worker = start_worker(["default"], extra_env={"CG_JSON_LOGS": "1"})
    user = User.objects.create_user("clicker", password="pw")
    client.force_login(user)
    response = client.get("/test/enqueue?label=rid", HTTP_X_REQUEST_ID="req-click-1")
    assert response["X-Request-ID"] == "req-click-1"
    parent_id = response.json()["task_id"]
    child = wait_until(lambda: Execution.objects.filter(label="rid-child").first(), timeout=60)
    assert child.guard_header["request"] == {"id": "req-click-1", "initiator": str(user.pk)}

    def started(task_name):
        return [
            r
            for r in log_records(worker)
            if r.get("event") == "started" and r.get("task_name") == task_name
        ]

    parent_logs = wait_until(lambda: started("tests.obs.parent_job"))
    assert parent_logs[0]["task_id"] == parent_id
    assert parent_logs[0]["request_id"] == "req-click-1"
    assert parent_logs[0]["initiator"] == str(user.pk)
    assert parent_logs[0]["queue"] == settings.CELERY_GUARD_PRIORITY_QUEUES["default"]
    child_logs = wait_until(lambda: started("tests.testapp.tasks.default_job"))
    assert child_logs[0]["request_id"] == "req-click-1"
    succeeded = wait_until(
        lambda: [r for r in log_records(worker) if r.get("event") == "succeeded"], timeout=30
    )
    assert {r["request_id"] for r in succeeded} == {"req-click-1"}


def scrape(client, token: str) -> dict[tuple[str, tuple], float]:
    """The exposition of celery-guard/metrics as {(sample name, sorted labels): value}."""
    response = client.get("/celery-guard/metrics", HTTP_AUTHORIZATION=f"Bearer {token}")
    assert response.status_code == 200, response.content
    samples = {}
    for family in text_string_to_metric_families(response.content.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def total(samples, name: str, **labels) -> float:
    """Sum of the samples ``name`` whose labels include ``labels``."""
    return sum(
        value
        for (sample, sample_labels), value in samples.items()
        if sample == name and set(labels.items()) <= set(sample_labels)
    )


def test_prefork_pool_with_replaced_processes_counts_every_outcome(
    client, start_worker, tmp_path, monkeypatch, settings
):
    settings.CELERY_GUARD_METRICS_TOKEN = "t0ken"
    metrics_dir = tmp_path / "prom"
    metrics_dir.mkdir()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(metrics_dir))
    start_worker(
        ["default"],
        concurrency=2,
        extra_env={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)},
        extra_args=["--max-tasks-per-child", "3"],
    )
    n = 20
    for i in range(n):
        obs_timed_job.delay(f"prom-{i}", 5)
    name = "tests.obs.timed_job"

    def settled():
        # Each delivery writes one Execution row; a redelivery (at least once) writes another
        # and must be counted too: the outcomes equal the deliveries that ran, no fewer.
        runs = Execution.objects.filter(task=name).count()
        if runs < n:
            return None
        samples = scrape(client, "t0ken")
        done = total(samples, "celery_guard_task_outcomes_total", task=name)
        started = total(samples, "celery_guard_task_lag_seconds_count", task=name)
        return (runs, samples) if done == started == runs else None

    runs, samples = wait_until(settled, timeout=120, interval=0.5)
    assert (
        total(samples, "celery_guard_task_outcomes_total", task=name, outcome="succeeded") == runs
    )
    assert total(samples, "celery_guard_task_lag_seconds_count", task=name) == runs
    assert total(samples, "celery_guard_task_duration_seconds_count", task=name) == runs
    assert runs >= n
    pids = {p.name.rsplit("_", 1)[-1] for p in metrics_dir.glob("counter_*.db")}
    assert len(pids) >= 7


def test_metrics_endpoint_refuses_anonymous_and_wrong_tokens(client, settings):
    settings.CELERY_GUARD_METRICS_TOKEN = "right"
    assert client.get("/celery-guard/metrics").status_code == 403
    wrong = client.get("/celery-guard/metrics", HTTP_AUTHORIZATION="Bearer wrong")
    assert wrong.status_code == 403
    User.objects.create_user("ops", password="pw", is_staff=True)
    client.login(username="ops", password="pw")
    assert client.get("/celery-guard/metrics").status_code == 200


def test_queue_depth_and_oldest_age_follow_a_backlog_and_its_drain(
    client, start_worker, settings, monkeypatch
):
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    settings.CELERY_GUARD_METRICS_TOKEN = "t"
    queue = settings.CELERY_GUARD_PRIORITY_QUEUES["default"]
    for i in range(4):
        obs_timed_job.delay(f"backlog-{i}")
    # One message in a Celery priority sub-list of the same queue counts too.
    obs_timed_job.apply_async(("backlog-pri",), priority=6)
    first = scrape(client, "t")
    assert total(first, "celery_guard_queue_depth", queue=queue) == 5
    age = total(first, "celery_guard_queue_oldest_age_seconds", queue=queue)
    assert age > 0
    for i in range(3):
        obs_timed_job.delay(f"backlog-more-{i}")
    second = scrape(client, "t")
    assert total(second, "celery_guard_queue_depth", queue=queue) == 8
    # The oldest message is still the first one: the age only grows.
    assert total(second, "celery_guard_queue_oldest_age_seconds", queue=queue) >= age
    start_worker(["default"])
    drained = wait_until(
        lambda: (
            (s := scrape(client, "t"))
            and total(s, "celery_guard_queue_depth", queue=queue) == 0
            and s
        ),
        timeout=60,
        interval=0.5,
    )
    assert ("celery_guard_queue_oldest_age_seconds", (("queue", queue),)) not in drained


def test_sentry_gets_one_event_per_dead_letter_and_none_for_a_retried_success(
    start_worker, tmp_path
):
    path = tmp_path / "sentry.jsonl"
    start_worker(["default"], extra_env={"CG_SENTRY_FILE": str(path)})
    label = uuid.uuid4().hex[:6]
    obs_flaky_job.delay(f"flaky-{label}")
    wait_until(lambda: Execution.objects.filter(label=f"flaky-{label}").count() == 2, timeout=60)
    result = obs_doomed_job.delay(f"doomed-{label}")
    row = wait_until(
        lambda: DeadLetter.objects.filter(task_id=result.id, sentry_event_id__isnull=False).first(),
        timeout=60,
    )
    # The flaky job finished before the doomed one started (one process): nothing for it.
    captured = sentry_events(str(path))
    assert len(captured) == 1, captured
    event = captured[0]
    assert event["event_id"] == row.sentry_event_id
    assert event["exception"][-1] == "ConnectionError"
    assert event["tags"]["celery_guard.task_name"] == "tests.obs.doomed_job"
    assert event["tags"]["celery_guard.reason"] == "exhausted"
    assert event["tags"]["celery_guard.attempt"] == "2"
    assert event["tags"]["celery_guard.queue"] == settings.CELERY_GUARD_PRIORITY_QUEUES["default"]
    assert [b["message"] for b in event["breadcrumbs"] if b.get("category") == "celery_guard"][
        :2
    ] == [
        "attempt 1 failed: builtins.ConnectionError",
        "attempt 2 failed: builtins.ConnectionError",
    ]


def test_beat_fired_runs_send_sentry_cron_checkins_to_their_monitors(start_worker, tmp_path):
    from django_celery_beat.models import IntervalSchedule, PeriodicTask

    from celery_guard.beat import crons, fires, slots

    path = tmp_path / "sentry.jsonl"
    every = IntervalSchedule.objects.create(every=5, period=IntervalSchedule.MINUTES)
    PeriodicTask.objects.create(name="obs cron/ok", task="tests.obs.flaky_job", interval=every)
    start_worker(["default"], extra_env={"CG_SENTRY_FILE": str(path)})
    slot = dt.datetime(2030, 1, 1, 12, 0, tzinfo=dt.timezone.utc)
    label = uuid.uuid4().hex[:6]
    # As the guarded beat publishes a slot: the guard header's beat field.
    obs_flaky_job.apply_async(
        (f"cron-{label}",), headers=fires.message_headers("obs cron/ok", slot, 1)
    )
    doomed = obs_doomed_job.apply_async(
        (f"cron-doomed-{label}",), headers=fires.message_headers("obs-cron-doomed", slot, 1)
    )
    wait_until(lambda: DeadLetter.objects.filter(task_id=doomed.id).exists(), timeout=60)
    wait_until(lambda: len(sentry_checkins(str(path))) >= 6, timeout=30)
    found = sentry_checkins(str(path))
    by_slug: dict[str, list[dict]] = {}
    for checkin in found:
        by_slug.setdefault(checkin["monitor_slug"], []).append(checkin)
    assert set(by_slug) == {"obs-cron-ok", "doomed-monitor"}
    # A retried run: in progress twice (one per delivery), then ok, under one check-in id.
    ok = by_slug["obs-cron-ok"]
    assert [c["status"] for c in ok] == ["in_progress", "in_progress", "ok"]
    assert {c["check_in_id"] for c in ok} == {
        crons.check_in_id(slots.slot_key("obs cron/ok", slot))
    }
    every_5 = {"type": "interval", "value": 5, "unit": "minute"}
    assert ok[0]["monitor_config"] == {"schedule": every_5}
    # A dead-lettered run ends in error; its entry has no PeriodicTask row: no configuration.
    doomed_checkins = by_slug["doomed-monitor"]
    assert [c["status"] for c in doomed_checkins] == ["in_progress", "in_progress", "error"]
    assert len({c["check_in_id"] for c in doomed_checkins}) == 1
    assert "monitor_config" not in doomed_checkins[0]
    # The dead letter is still one error event; check-ins are not events.
    assert len(sentry_events(str(path))) == 1
