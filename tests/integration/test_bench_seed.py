"""The benchmark's dead-letter seeder (bench/seed.py) and its command line, on the database."""

import subprocess
import sys

import pytest
from django.utils import timezone

from bench import seed as seeding
from celery_guard.models import DeadLetter
from tests.support.harness import ROOT, process_env


@pytest.mark.django_db
def test_seed_copies_exactly_the_fake_rows(postgres, monkeypatch):
    def no_bulk_create(*args, **kwargs):
        raise AssertionError("PostgreSQL seeds with COPY")

    monkeypatch.setattr(DeadLetter.objects, "bulk_create", no_bulk_create)
    now = timezone.now()
    assert seeding.seed(12, seed=3, now=now) == 12
    names = [f.attname for f in DeadLetter._meta.concrete_fields if not f.primary_key]
    expected = [
        tuple(getattr(row, name) for name in names)
        for row in seeding.fake_rows(12, seed=3, now=now)
    ]
    # Every column read back as bulk_create would have written it: a column out of order,
    # double-encoded JSON or "None" for NULL all differ.
    assert list(DeadLetter.objects.order_by("pk").values_list(*names)) == expected
    written = DeadLetter.objects.all()
    assert {row.tenant is None for row in written} == {True, False}
    assert {row.idempotency_key is None for row in written} == {True, False}


@pytest.mark.django_db(transaction=True)
def test_seed_dead_letters_command_fills_the_database(test_db_name, redis_url):
    env = process_env(redis_url, test_db_name)
    command = [sys.executable, "-m", "bench", "seed-dead-letters", "30", "--batch", "7"]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "seeded 30 dead letter(s)" in done.stdout
    assert DeadLetter.objects.count() == 30
    assert DeadLetter.objects.exclude(status="dead").exists()  # the seed mixes statuses
