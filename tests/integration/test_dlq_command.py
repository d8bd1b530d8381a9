"""``manage.py celery_guard replay / purge`` on the real broker."""

import datetime as dt
import io
import re

import pytest
from django.contrib.admin.models import LogEntry
from django.core.management import CommandError, call_command
from django.utils import timezone

from bench import seed as seeding
from celery_guard.models import DeadLetter, DeadLetterReplay
from tests.support.dlq import dead_letter, operator, published, replay_process, run_command
from tests.support.harness import queue_length
from tests.testapp import dlq_tasks

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("empty_queues")]


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
    run_command("replay", "--reason", "exhausted", "--no-progress")
    assert replayed_labels() == ["b"]
    run_command("replay", "--exception", "x.Boom", "--no-progress")
    assert replayed_labels() == ["b", "c"]
    out, _ = run_command("replay", "--since", "4h", "--until", "2h", "--no-progress")
    assert replayed_labels() == ["a", "b", "c"]
    assert (
        "1 replayed, 0 skipped (not dead any more, or in another replay), 0 unroutable of 1" in out
    )
    run_command("replay", "--queue", "elsewhere", "--task", dlq_tasks.dlq_until_fixed.name)
    assert replayed_labels() == ["a", "b", "c", "d"]
    run_command("replay", "--until", "4h")
    assert replayed_labels() == ["a", "b", "c", "d", "f"]
    run_command("replay", "--limit", "1", "--no-progress")
    assert replayed_labels() == ["a", "b", "c", "d", "f", "g"]
    assert queue_length(redis_url, queues["default"]) == 4
    assert DeadLetter.objects.get(args=["e"]).status == "discarded"
    out, _ = run_command("replay")  # nothing dead is left: nothing more is published
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
    out, _ = run_command("replay", "--dry-run")
    assert "would have 1 replayed" in out and not LogEntry.objects.exists()


def test_dry_run_and_limit(redis_url, queues):
    for n in range(4):
        dead_letter(f"dry{n}")
    dead_letter("gone", task_name="nope.task")
    out, _ = run_command("replay", "--dry-run", "--no-progress")
    assert "dry run: would have 4 replayed, 0 skipped (not dead any more, or in another " in out
    assert "replay), 1 unroutable" in out
    assert "unroutable #" in out and "not registered" in out
    assert queue_length(redis_url, queues["default"]) == 0
    assert set(DeadLetter.objects.values_list("status", flat=True)) == {"dead"}
    out, err = run_command("replay", "--limit", "2")
    assert "2 replayed" in out and "2/2" in err  # the progress bar ends at the total
    assert queue_length(redis_url, queues["default"]) == 2


def test_rate_paces_the_publishes(redis_url, queues):
    q = queues["default"]
    for n in range(5):
        dead_letter(f"paced{n}")
    run_command("replay", "--rate", "10/s", "--no-progress")
    # Each message's guard header is stamped just before its publish.
    stamps = sorted(m[0]["celery_guard"]["first_enqueued_at"] for m in published(redis_url, q))
    assert len(stamps) == 5 and DeadLetterReplay.objects.count() == 5
    # 5 publishes at 10/s: the first is immediate, then one every 0.1 s at the earliest.
    assert stamps[-1] - stamps[0] >= 0.35
    with pytest.raises(CommandError, match="rate must look like"):
        run_command("replay", "--rate", "fast")
    with pytest.raises(CommandError, match="ISO date"):
        run_command("replay", "--since", "yesterday")


def test_purge():
    seeding.seed(30, batch=7)
    old = timezone.now() - dt.timedelta(days=400)
    DeadLetter.objects.filter(status__in=["replayed", "discarded"]).update(failed_at=old)
    finished = DeadLetter.objects.filter(status__in=["replayed", "discarded"]).count()
    assert finished  # the seed mixes statuses
    out, _ = run_command("purge")
    assert f"purged {finished} dead letter(s)" in out
    assert "idempotency record(s)" in out
    assert set(DeadLetter.objects.values_list("status", flat=True)) == {"dead"}
    for bad in ("0", "-1"):
        with pytest.raises(CommandError, match="--days must be at least 1 day"):
            run_command("purge", "--days", bad)


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
