"""Tasks of the observability tests (issue 18); imported by tests.testapp.tasks."""

import time

from celery_guard import guarded_task
from tests.testapp.models import Execution


def _record(task, label: str, sleep_ms: int = 0) -> None:
    from tests.testapp.tasks import record

    record(task, label, sleep_ms)


@guarded_task(bind=True, name="tests.obs.parent_job")
def obs_parent_job(self, label: str) -> None:
    """Enqueues a child guarded task: the child keeps this run's request id."""
    from tests.testapp.tasks import default_job

    _record(self, label)
    default_job.delay(f"{label}-child")


@guarded_task(bind=True, name="tests.obs.timed_job")
def obs_timed_job(self, label: str, sleep_ms: int = 0) -> None:
    _record(self, label, sleep_ms)


@guarded_task(bind=True, name="tests.obs.flaky_job", max_attempts=3, backoff=0.05)
def obs_flaky_job(self, label: str) -> None:
    """Fails its first attempt with a transient error, then succeeds."""
    _record(self, label)
    if self.request.retries == 0:
        raise ConnectionError(f"{label}: first attempt fails")


@guarded_task(bind=True, name="tests.obs.doomed_job", max_attempts=2, backoff=0.05)
def obs_doomed_job(self, label: str) -> None:
    """Always fails (transient): dead-lettered once its attempts are used."""
    _record(self, label)
    time.sleep(0.01)
    raise ConnectionError(f"{label}: always fails")


__all__ = ["Execution", "obs_doomed_job", "obs_flaky_job", "obs_parent_job", "obs_timed_job"]
