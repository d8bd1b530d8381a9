"""``manage.py celery_guard replay / purge / seed-dead-letters`` on the real broker."""

import datetime as dt
import io
import os
import re
import signal
import subprocess
import sys

import pytest
from django.contrib.admin.models import LogEntry
from django.contrib.auth.models import User
from django.core.management import CommandError, call_command
from django.utils import timezone

from celery_guard.idempotency import keys
from celery_guard.models import DeadLetter, DeadLetterReplay
from tests.dlq_support import dead_letter, published
from tests.harness import ROOT, queue_length, wait_until
from tests.testapp import dlq_tasks, idem_tasks
from tests.testapp.models import Execution

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("empty_queues")]


def run(*args):
    out, err = io.StringIO(), io.StringIO()
    if args[:1] == ("replay",) and "--dry-run" not in args:
        args = (*args, "--user", operator().username)
    call_command("celery_guard", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def operator():
    """The Django user the command's replays are audited under."""
    return User.objects.get_or_create(username="ops")[0]


def replayed_labels():
    return sorted(
        r.dead_letter.args[0] for r in DeadLetterReplay.objects.select_related("dead_letter")
    )


def test_filters_select_what_is_replayed(redis_url, queues):
    now = timezone.now()

    def ago(**delta):
        return now - dt.timedelta(**delta)

    dead_letter("a", failed_at=ago(hours=3))
    dead_letter("b", failed_at=ago(minutes=30), reason="exhausted")
    dead_letter("c", failed_at=ago(minutes=10), exception_class="x.Boom")
    dead_letter("d", failed_at=ago(minutes=5), queue="elsewhere")
    dead_letter("e", failed_at=ago(minutes=1), status="discarded")
    # Each filter below leaves out a row that only that filter excludes.
    dead_letter("f", failed_at=ago(hours=5))  # --since
    plain = dlq_tasks.dlq_plain.name
    dead_letter("g", failed_at=ago(minutes=4), queue="elsewhere", task_name=plain)  # --task
    run("replay", "--reason", "exhausted", "--no-progress")
    assert replayed_labels() == ["b"]
    run("replay", "--exception", "x.Boom", "--no-progress")
    assert replayed_labels() == ["b", "c"]
    out, _ = run("replay", "--since", "4h", "--until", "2h", "--no-progress")
    assert replayed_labels() == ["a", "b", "c"]
    assert (
        "1 replayed, 0 skipped (not dead any more, or in another replay), 0 unroutable of 1" in out
    )
    run("replay", "--queue", "elsewhere", "--task", dlq_tasks.dlq_until_fixed.name)
    assert replayed_labels() == ["a", "b", "c", "d"]
    run("replay", "--until", "4h")
    assert replayed_labels() == ["a", "b", "c", "d", "f"]
    run("replay", "--limit", "1", "--no-progress")
    assert replayed_labels() == ["a", "b", "c", "d", "f", "g"]
    assert queue_length(redis_url, queues["default"]) == 4
    assert DeadLetter.objects.get(args=["e"]).status == "discarded"
    out, _ = run("replay")  # nothing dead is left: nothing more is published
    assert "0 replayed" in out and "of 0 matching" in out
    # Each replay is in the admin log, under the operator, naming the command.
    entries = LogEntry.objects.filter(user=operator())
    assert entries.count() == 6
    assert all("(manage.py celery_guard replay)" in e.change_message for e in entries)
    assert set(DeadLetterReplay.objects.values_list("replayed_by", flat=True)) == {"ops"}


def test_replay_needs_a_known_user_except_for_a_dry_run(redis_url, queues):
    dead_letter("who")
    with pytest.raises(CommandError, match="--user USERNAME is required"):
        call_command("celery_guard", "replay", stdout=io.StringIO())
    with pytest.raises(CommandError, match="no Django user 'nobody'"):
        call_command("celery_guard", "replay", "--user", "nobody", stdout=io.StringIO())
    assert queue_length(redis_url, queues["default"]) == 0
    out, _ = run("replay", "--dry-run")
    assert "would have 1 replayed" in out and not LogEntry.objects.exists()


def test_dry_run_and_limit(redis_url, queues):
    for n in range(4):
        dead_letter(f"dry{n}")
    dead_letter("gone", task_name="nope.task")
    out, _ = run("replay", "--dry-run", "--no-progress")
    assert "dry run: would have 4 replayed, 0 skipped (not dead any more, or in another " in out
    assert "replay), 1 unroutable" in out
    assert "unroutable #" in out and "not registered" in out
    assert queue_length(redis_url, queues["default"]) == 0
    assert set(DeadLetter.objects.values_list("status", flat=True)) == {"dead"}
    out, err = run("replay", "--limit", "2")
    assert "2 replayed" in out and "2/2" in err  # the progress bar ends at the total
    assert queue_length(redis_url, queues["default"]) == 2


def test_rate_paces_the_publishes(redis_url, queues):
    q = queues["default"]
    for n in range(5):
        dead_letter(f"paced{n}")
    run("replay", "--rate", "10/s", "--no-progress")
    # Each message's guard header is stamped just before its publish.
    stamps = sorted(m[0]["celery_guard"]["first_enqueued_at"] for m in published(redis_url, q))
    assert len(stamps) == 5 and DeadLetterReplay.objects.count() == 5
    # 5 publishes at 10/s: the first is immediate, then one every 0.1 s at the earliest.
    assert stamps[-1] - stamps[0] >= 0.35
    with pytest.raises(CommandError, match="rate must look like"):
        run("replay", "--rate", "fast")
    with pytest.raises(CommandError, match="ISO date"):
        run("replay", "--since", "yesterday")


def test_purge_and_seed():
    out, _ = run("seed-dead-letters", "30", "--batch", "7")
    assert "seeded 30" in out and DeadLetter.objects.count() == 30
    old = timezone.now() - dt.timedelta(days=400)
    DeadLetter.objects.filter(status__in=["replayed", "discarded"]).update(failed_at=old)
    finished = DeadLetter.objects.filter(status__in=["replayed", "discarded"]).count()
    assert finished  # the seed mixes statuses
    out, _ = run("purge")
    assert f"purged {finished} dead letter(s)" in out
    assert "idempotency record(s)" in out
    assert set(DeadLetter.objects.values_list("status", flat=True)) == {"dead"}
    for bad in ("0", "-1"):
        with pytest.raises(CommandError, match="--days must be at least 1 day"):
            run("purge", "--days", bad)


def replay_process(test_db_name, redis_url, *args):
    """``manage.py celery_guard replay *args`` in a process of its own, on the test database."""
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "example_project")]),
        "CG_WORKER_DB_NAME": test_db_name,
        "CELERY_BROKER_URL": redis_url,
        "CELERY_GUARD_LOG_LEVEL": "WARNING",
    }
    command = [sys.executable, "-m", "django", "celery_guard", "replay", *args]
    command += ["--user", operator().username]
    return subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True)


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_two_replay_processes_at_once_publish_each_row_once(test_db_name, redis_url, queues):
    rows = [dead_letter(f"proc{n}") for n in range(60)]
    procs = [replay_process(test_db_name, redis_url, "--rate", "2000/s") for _ in range(2)]
    outputs = [proc.communicate(timeout=120)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    replayed = [int(re.search(r"(\d+) replayed", out).group(1)) for out in outputs]
    skipped = [int(re.search(r"(\d+) skipped", out).group(1)) for out in outputs]
    # Both saw all 60 rows, or one found them already replayed: never 60 published twice.
    assert sum(replayed) == 60 and sum(replayed) + sum(skipped) <= 120
    assert queue_length(redis_url, queues["default"]) == 60
    assert DeadLetterReplay.objects.count() == 60
    assert set(
        DeadLetter.objects.filter(pk__in=[r.pk for r in rows]).values_list("status", flat=True)
    ) == {"replayed"}


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_a_replay_killed_mid_batch_loses_nothing_and_each_key_runs_once(
    test_db_name, redis_url, queues, start_worker
):
    high = queues["high"]
    name = idem_tasks.idem_notify.name
    rows = [
        dead_letter(
            f"crash{n}",
            task_name=name,
            queue=high,
            args=[n, "v1"],
            headers={"celery_guard": {"v": 1, "attempt": 2, "priority": "high"}},
            idempotency_key=keys.namespaced(name, f"notify:{n}:v1"),
        )
        for n in range(30)
    ]
    # 20/s makes batches of 10 (half a second of publishing each): killed after 3 publishes,
    # the first batch has published but not committed its claim.
    proc = replay_process(test_db_name, redis_url, "--rate", "20/s", "--no-progress")
    wait_until(lambda: queue_length(redis_url, high) >= 3, timeout=60, interval=0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    early = {
        headers["id"]: headers["celery_guard"]["replay_of"]
        for headers, _, _ in published(redis_url, high)
    }
    recorded = set(DeadLetterReplay.objects.values_list("task_id", flat=True))
    assert recorded <= set(early)  # every committed claim was published
    orphans = {dl for task_id, dl in early.items() if task_id not in recorded}
    assert orphans  # published before the kill, claim never committed
    # Those dead letters are dead still, not "replayed" without a run: nothing is lost.
    assert set(DeadLetter.objects.filter(pk__in=orphans).values_list("status", flat=True)) == {
        "dead"
    }

    out, _ = run("replay", "--rate", "1000/s", "--no-progress")
    assert f"{30 - len(recorded)} replayed" in out
    assert set(
        DeadLetter.objects.filter(pk__in=[r.pk for r in rows]).values_list("status", flat=True)
    ) == {"replayed"}
    duplicates = len(orphans)
    assert queue_length(redis_url, high) == 30 + duplicates  # at least once, not exactly once

    worker = start_worker(["high"])
    wait_until(lambda: Execution.objects.filter(task=name).count() == 30, timeout=60)
    # The duplicates of the killed batch ran into their keys and were skipped.
    wait_until(lambda: worker.log_tail(400).count("already succeeded") == duplicates, timeout=30)
    labels = list(Execution.objects.filter(task=name).values_list("label", flat=True))
    assert len(set(labels)) == 30 == len(labels)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("replay", "--limit", "-1"), "--limit must be at least 1, got -1"),
        (("replay", "--limit", "0"), "--limit must be at least 1, got 0"),
        (("replay", "--since", "99999999999d"), "age '99999999999d' reaches before year 1"),
        (("replay", "--until", "9" * 400 + "d"), "reaches before year 1"),
        (("replay", "--rate", "9" * 400 + "/s"), "rate must look like 200/s"),
        (("purge", "--days", "inf"), "--days must be a finite number of days, got inf"),
        (("purge", "--days", "nan"), "--days must be a finite number of days, got nan"),
        (("purge", "--days", "1e12"), "--days must be at most 3660 days"),
        (("purge", "--days", "1e-9"), "--days must be at least 1 day, got 1e-09"),
        (("purge", "--days", "0"), "--days must be at least 1 day"),
        (("doctor", "--timeout", "nan"), "--timeout must be a finite number of seconds"),
        (("doctor", "--timeout", "inf"), "--timeout must be a finite number of seconds"),
        (("doctor", "--timeout", "-1"), "--timeout must be a positive number of seconds"),
        (("doctor", "--timeout", "601"), "--timeout must be at most 600 seconds"),
        (("seed-dead-letters", "-1"), "count must be at least 0"),
        (("seed-dead-letters", "1", "--batch", "0"), "--batch must be at least 1"),
    ],
)
def test_every_argument_is_checked_before_anything_is_done(args, message, redis_url, queues):
    # Replayed an hour ago: what "--days 1e-9" would purge.
    kept = dead_letter("kept", status=DeadLetter.Status.REPLAYED)
    DeadLetter.objects.filter(pk=kept.pk).update(failed_at=timezone.now() - dt.timedelta(hours=1))
    pending = dead_letter("pending")
    with pytest.raises(CommandError, match=re.escape(message)):
        run(*args)
    assert DeadLetter.objects.filter(pk=kept.pk).exists()
    pending.refresh_from_db()
    assert pending.status == DeadLetter.Status.DEAD
    assert not DeadLetterReplay.objects.exists()
    assert queue_length(redis_url, queues["default"]) == 0


def test_purge_checks_the_retention_setting_before_purging_anything(settings):
    settings.CELERY_GUARD_DLQ_RETENTION_DAYS = float("inf")
    with pytest.raises(CommandError, match="CELERY_GUARD_DLQ_RETENTION_DAYS"):
        run("purge")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("runs", "--limit", "0"), "--limit must be at least 1, got 0"),
        (("runs", "watch", "1", "--interval", "nan"), "--interval must be a finite number"),
        (("runs", "watch", "1", "--interval", "-1"), "--interval must be a positive number"),
    ],
)
def test_runs_arguments_are_checked(args, message):
    with pytest.raises(CommandError, match=re.escape(message)):
        run(*args)
