"""Slots of beat entries: the UTC grid, catch-up and policies, crontabs across DST (pure)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from celery import Celery, schedules
from django_celery_beat.tzcrontab import TzAwareCrontab

from celery_guard.beat import slots

UTC = timezone.utc
BERLIN = ZoneInfo("Europe/Berlin")
LATEST = slots.EntryPolicy()
SKIP = slots.EntryPolicy(catchup="skip")


def at(*args, tz=UTC):
    return datetime(*args, tzinfo=tz)


def every(seconds):
    return schedules.schedule(timedelta(seconds=seconds))


def test_interval_slots_follow_last_run_and_are_whole_seconds():
    last = at(2026, 1, 1, 12, 0, 0, 400_000)
    assert slots.next_slot(every(10), last) == at(2026, 1, 1, 12, 0, 10)
    assert slots.next_slot(every(10), at(2026, 1, 1, 12, 0, 10)) == at(2026, 1, 1, 12, 0, 20)
    # Naive and non-UTC inputs name the same instant.
    local = at(2026, 1, 1, 13, 0, 10, tz=BERLIN)
    assert slots.next_slot(every(10), local) == at(2026, 1, 1, 12, 0, 20)
    sub_second = schedules.schedule(timedelta(milliseconds=250))
    assert slots.next_slot(sub_second, last) == at(2026, 1, 1, 12, 0, 0, 650_000)


def test_plan_on_time_fires_the_due_slot_and_points_at_the_next():
    last = at(2026, 1, 1, 12, 0, 0)
    assert slots.plan(every(5), last, at(2026, 1, 1, 12, 0, 4), policy=LATEST, grace=2) is None
    plan = slots.plan(every(5), last, at(2026, 1, 1, 12, 0, 5, 300), policy=LATEST, grace=2)
    assert plan == slots.Plan(
        slot=at(2026, 1, 1, 12, 0, 5),
        fire=True,
        missed=(),
        missed_total=0,
        following=at(2026, 1, 1, 12, 0, 10),
    )


def test_catchup_latest_fires_the_most_recent_slot_and_records_the_rest_missed():
    last = at(2026, 1, 1, 12, 0, 0)
    now = at(2026, 1, 1, 12, 0, 32)
    plan = slots.plan(every(5), last, now, policy=LATEST, grace=2)
    assert plan.slot == at(2026, 1, 1, 12, 0, 30) and plan.fire
    assert plan.missed == tuple(at(2026, 1, 1, 12, 0, s) for s in (5, 10, 15, 20, 25))
    assert plan.missed_total == 5
    assert plan.following == at(2026, 1, 1, 12, 0, 35)


def test_catchup_skip_fires_only_an_on_time_slot():
    last = at(2026, 1, 1, 12, 0, 0)
    late = slots.plan(every(5), last, at(2026, 1, 1, 12, 0, 33), policy=SKIP, grace=2)
    assert late.slot == at(2026, 1, 1, 12, 0, 30) and not late.fire
    assert late.missed_total == 5
    on_time = slots.plan(every(5), last, at(2026, 1, 1, 12, 0, 31), policy=SKIP, grace=2)
    assert on_time.slot == at(2026, 1, 1, 12, 0, 30) and on_time.fire


def test_a_short_stall_fires_every_slot_that_is_still_on_time():
    last = at(2026, 1, 1, 12, 0, 0)
    now = at(2026, 1, 1, 12, 0, 2, 500_000)  # the beat stalled 1.5 s past a 1-second slot
    for policy in (LATEST, SKIP):
        plan = slots.plan(every(1), last, now, policy=policy, grace=2)
        assert (plan.slot, plan.fire, plan.missed) == (at(2026, 1, 1, 12, 0, 1), True, ())
        assert plan.following == at(2026, 1, 1, 12, 0, 2)  # due too: fired on the next tick
        again = slots.plan(every(1), plan.slot, now, policy=policy, grace=2)
        assert (again.slot, again.fire) == (at(2026, 1, 1, 12, 0, 2), True)


def test_a_long_downtime_records_only_the_most_recent_missed_slots():
    last = at(2026, 1, 1, 0, 0, 0)
    plan = slots.plan(every(1), last, at(2026, 1, 2, 0, 0, 0, 500), policy=LATEST, grace=2)
    # 23:59:59 and 00:00:00 are within the grace: they fire, the earlier ones were missed.
    assert plan.slot == at(2026, 1, 1, 23, 59, 59) and plan.missed_total == 86_398
    assert len(plan.missed) == slots.MISSED_RECORD_LIMIT
    assert plan.missed[-1] == at(2026, 1, 1, 23, 59, 58)
    assert plan.following == at(2026, 1, 2)


def test_two_processes_compute_the_same_slot_whatever_their_clock():
    last = at(2026, 1, 1, 12, 0, 0)
    a = slots.plan(every(60), last, at(2026, 1, 1, 12, 1, 0, 10), policy=LATEST, grace=120)
    b = slots.plan(every(60), last, at(2026, 1, 1, 12, 1, 40), policy=LATEST, grace=120)
    assert a.slot == b.slot == at(2026, 1, 1, 12, 1)
    assert slots.slot_key("e", a.slot) == "beat:e:2026-01-01T12:01:00Z"


def berlin_cron(**fields):
    return TzAwareCrontab(tz=BERLIN, **fields)


def walk(schedule, start, count):
    found, slot = [], start
    for _ in range(count):
        slot = slots.next_slot(schedule, slot)
        found.append(slot)
    return found


def test_daily_crontab_in_local_time_keeps_its_wall_clock_across_dst():
    # 09:00 Europe/Berlin: 08:00 UTC in winter, 07:00 UTC after the spring-forward on
    # 2026-03-29, back to 08:00 UTC after the fall-back on 2026-10-25.
    nine = berlin_cron(minute="0", hour="9")
    spring = walk(nine, at(2026, 3, 27, 9, 0, tz=BERLIN), 3)
    assert spring == [at(2026, 3, 28, 8), at(2026, 3, 29, 7), at(2026, 3, 30, 7)]
    autumn = walk(nine, at(2026, 10, 23, 9, 0, tz=BERLIN), 3)
    assert autumn == [at(2026, 10, 24, 7), at(2026, 10, 25, 8), at(2026, 10, 26, 8)]
    assert all(s.astimezone(BERLIN).hour == 9 for s in spring + autumn)


def test_hourly_crontab_across_dst_changes_never_repeats_or_goes_back():
    half_past = berlin_cron(minute="30")
    for start in (at(2026, 3, 28, 23, 30, tz=BERLIN), at(2026, 10, 24, 23, 30, tz=BERLIN)):
        found = walk(half_past, start, 6)
        assert found == sorted(set(found)), found
        assert all(s.astimezone(BERLIN).minute == 30 for s in found)
    # Spring forward: 02:30 does not exist that night, so the hour after 01:30 CET is 03:30
    # CEST, one real hour later.
    spring = walk(half_past, at(2026, 3, 29, 1, 30, tz=BERLIN), 1)
    assert spring == [at(2026, 3, 29, 1, 30)]
    # Fall back: 02:30 happens twice; it runs once (as django-celery-beat's crontab does,
    # at the first occurrence) and the next run is 03:30 CET.
    autumn = walk(half_past, at(2026, 10, 25, 1, 30, tz=BERLIN), 2)
    assert autumn == [at(2026, 10, 25, 0, 30), at(2026, 10, 25, 2, 30)]


def test_crontab_catchup_fires_on_time_slots_one_by_one():
    every_ten = berlin_cron(minute="*/10")
    last = at(2026, 1, 1, 12, 0)
    plan = slots.plan(every_ten, last, at(2026, 1, 1, 12, 45), policy=SKIP, grace=20 * 60)
    assert plan.slot == at(2026, 1, 1, 12, 30) and plan.fire
    assert plan.missed == tuple(at(2026, 1, 1, 12, m) for m in (10, 20))
    late = slots.plan(every_ten, last, at(2026, 1, 1, 12, 45), policy=SKIP, grace=60)
    assert late.slot == at(2026, 1, 1, 12, 40) and not late.fire and late.missed_total == 3


def test_crontab_catchup_after_a_long_downtime_finds_the_latest_slot():
    minutely = berlin_cron(minute="*")
    last = at(2026, 1, 1, 0, 0)
    now = at(2026, 1, 10, 12, 34, 56)  # ~13 700 slots: more than the walk limit
    plan = slots.plan(minutely, last, now, policy=LATEST, grace=10)
    assert plan.slot == at(2026, 1, 10, 12, 34) and plan.fire
    assert plan.following == at(2026, 1, 10, 12, 35)
    assert len(plan.missed) == slots.MISSED_RECORD_LIMIT
    assert plan.missed_total > slots.WALK_LIMIT


def test_policies_parse_and_fall_back_to_the_star_default():
    policies = {"nightly": {"catchup": "skip", "overlap": "skip"}, "*": {"overlap": "skip"}}
    assert slots.policy_for("nightly", policies) == slots.EntryPolicy("skip", "skip")
    assert slots.policy_for("other", policies) == slots.EntryPolicy(overlap="skip")
    assert slots.policy_for("other", {}) == slots.EntryPolicy()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("skip", "must be a dict"),
        ({"catchup": "all"}, "catchup must be one of"),
        ({"overlap": "queue"}, "overlap must be one of"),
        ({"overlap_timeout": 0}, "overlap_timeout must be a positive number"),
        ({"catch_up": "skip"}, "unknown key(s) 'catch_up'"),
        ({"sentry_monitor": "Not A Slug"}, "sentry_monitor must be True, False or a Sentry"),
        ({"sentry_monitor": "x" * 51}, "sentry_monitor must be True, False or a Sentry"),
        ({"sentry_monitor": 1.5}, "sentry_monitor must be True, False or a Sentry"),
    ],
)
def test_invalid_policies_are_refused(value, message):
    with pytest.raises(
        (TypeError, ValueError), match=message.replace("(", r"\(").replace(")", r"\)")
    ):
        slots.parse_policy(value)


def test_sentry_monitor_slugs_come_from_the_policy_or_the_entry_name():
    def slug(name, monitor):
        return slots.monitor_slug(name, slots.parse_policy({"sentry_monitor": monitor}))

    assert slug("Nightly Report", False) is None
    assert slug("Nightly Report/EU", True) == "nightly-report-eu"
    assert slug("x" * 80, True) == "x" * 50
    assert slug("###", True) == "celery-guard-beat"
    assert slug("Nightly Report", "nightly") == "nightly"


KOLKATA = ZoneInfo("Asia/Kolkata")
NEW_YORK = ZoneInfo("America/New_York")


def app_in(zone):
    app = Celery(set_as_current=False)
    app.conf.timezone = zone
    return app


@pytest.mark.parametrize(
    "nine",
    [
        TzAwareCrontab(minute="0", hour="9", tz=KOLKATA),  # django-celery-beat's crontab row
        schedules.crontab(minute="0", hour="9", app=app_in("Asia/Kolkata")),  # CELERY_TIMEZONE
    ],
    ids=["row-timezone", "app-timezone"],
)
def test_crontab_hours_are_matched_in_the_schedules_own_zone(nine):
    # 09:00 Asia/Kolkata is 03:30 UTC. Celery before 5.7 matched the hour of the time it was
    # given, so a UTC last run made this entry fire at 09:00 UTC (14:30 in Kolkata).
    assert walk(nine, at(2026, 5, 1, 3, 30), 2) == [at(2026, 5, 2, 3, 30), at(2026, 5, 3, 3, 30)]
    assert slots.next_slot(nine, at(2026, 5, 1, 3, 0)) == at(2026, 5, 1, 3, 30)
    assert slots.next_slot(nine, at(2026, 5, 1, 20, 0)) == at(2026, 5, 2, 3, 30)


def test_crontab_slots_do_not_depend_on_the_current_time():
    # Celery 5.5 looks at "now" to decide whether the rest of the last run's hour is still
    # ahead; slots are computed against the last run itself, so a catch-up over past days
    # finds every slot of every hour.
    every_ten = TzAwareCrontab(minute="*/10", tz=KOLKATA)
    long_ago = at(2020, 2, 29, 23, 40, tz=KOLKATA)
    assert walk(every_ten, long_ago, 3) == [
        at(2020, 2, 29, 23, 50, tz=KOLKATA),
        at(2020, 3, 1, 0, 0, tz=KOLKATA),
        at(2020, 3, 1, 0, 10, tz=KOLKATA),
    ]


@pytest.mark.parametrize(
    "make",
    [
        lambda **f: TzAwareCrontab(tz=NEW_YORK, **f),
        lambda **f: schedules.crontab(app=app_in("America/New_York"), **f),
    ],
    ids=["row-timezone", "app-timezone"],
)
def test_new_york_crontab_across_both_dst_changes(make):
    # 09:00 New York: 14:00 UTC in winter (EST), 13:00 UTC in summer (EDT). 2026's changes:
    # March 8 (02:00 -> 03:00) and November 1 (02:00 -> 01:00).
    nine = make(minute="0", hour="9")
    spring = walk(nine, at(2026, 3, 6, 9, tz=NEW_YORK), 3)
    assert spring == [at(2026, 3, 7, 14), at(2026, 3, 8, 13), at(2026, 3, 9, 13)]
    autumn = walk(nine, at(2026, 10, 30, 9, tz=NEW_YORK), 3)
    assert autumn == [at(2026, 10, 31, 13), at(2026, 11, 1, 14), at(2026, 11, 2, 14)]
    # Hourly at :30 through the night of each change: 02:30 does not exist on March 8 (it
    # becomes 03:30 EDT), and 01:30 on November 1 runs once, at its first occurrence.
    half_past = make(minute="30")
    assert walk(half_past, at(2026, 3, 8, 0, 30, tz=NEW_YORK), 3) == [
        at(2026, 3, 8, 6, 30),  # 01:30 EST
        at(2026, 3, 8, 7, 30),  # 03:30 EDT
        at(2026, 3, 8, 8, 30),  # 04:30 EDT
    ]
    assert walk(half_past, at(2026, 11, 1, 0, 30, tz=NEW_YORK), 3) == [
        at(2026, 11, 1, 5, 30),  # 01:30 EDT
        at(2026, 11, 1, 7, 30),  # 02:30 EST
        at(2026, 11, 1, 8, 30),  # 03:30 EST
    ]


def test_a_due_kolkata_entry_is_planned_at_its_local_time():
    nine = TzAwareCrontab(minute="0", hour="9", tz=KOLKATA)
    last = at(2026, 5, 1, 3, 30)
    # 09:00 UTC the next day is 14:30 in Kolkata: the 09:00 slot was due 5.5 hours earlier.
    assert slots.plan(nine, last, at(2026, 5, 2, 3, 29), policy=LATEST, grace=10) is None
    plan = slots.plan(nine, last, at(2026, 5, 2, 3, 30, 1), policy=LATEST, grace=10)
    assert (plan.slot, plan.fire, plan.following) == (
        at(2026, 5, 2, 3, 30),
        True,
        at(2026, 5, 3, 3, 30),
    )
