"""System check E007, and the guarded scheduler refusing USE_TZ = False (it uses the database)."""

import pytest
from celery import current_app
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings

from celery_guard.beat import GuardedScheduler
from celery_guard.beat import checks as beat_checks


@pytest.mark.django_db
def test_e007_the_guarded_beat_refuses_naive_datetimes(celery_conf):
    celery_conf(beat_scheduler="celery_guard.beat:GuardedScheduler")
    assert beat_checks.check_beat_use_tz() == []
    with override_settings(USE_TZ=False):
        [message] = beat_checks.check_beat_use_tz()
        # A beat started with `-S` is not seen by the check: the scheduler refuses too,
        # before it reads or writes anything.
        with pytest.raises(ImproperlyConfigured, match=r"celery_guard\.E007: USE_TZ"):
            GuardedScheduler(app=current_app._get_current_object(), max_interval=1)
        celery_conf(beat_scheduler="celery.beat:PersistentScheduler")
        assert beat_checks.check_beat_use_tz() == []
    assert message.id == "celery_guard.E007"
    assert "USE_TZ = True" in message.hint
