"""Tasks the integration tests run on real workers; each records its execution."""

import time

from celery import shared_task

from celery_guard import guarded_task
from tests.testapp.models import Execution


def record(task, label: str, sleep_ms: int = 0) -> None:
    """Write one Execution row for the running task, after sleeping ``sleep_ms``."""
    started = time.time()
    if sleep_ms:
        time.sleep(sleep_ms / 1000)
    Execution.objects.create(
        task=task.name,
        label=label,
        queue=(task.request.delivery_info or {}).get("routing_key") or "",
        hostname=task.request.hostname or "",
        guard_header=(task.request.headers or {}).get("celery_guard"),
        started_at=started,
        finished_at=time.time(),
    )


@guarded_task(priority="high", bind=True)
def high_job(self, label: str, sleep_ms: int = 0) -> None:
    record(self, label, sleep_ms)


@guarded_task(priority="low", bind=True)
def low_job(self, label: str, sleep_ms: int = 0) -> None:
    record(self, label, sleep_ms)


@guarded_task(bind=True)
def default_job(self, label: str, sleep_ms: int = 0) -> None:
    record(self, label, sleep_ms)


@shared_task(bind=True)
def plain_job(self, label: str) -> None:
    record(self, label)


@guarded_task(priority="high", bind=True, max_retries=3)
def retry_once_job(self, label: str) -> None:
    record(self, label)
    if self.request.retries == 0:
        raise self.retry(countdown=0.1)


from tests.testapp.dlq_tasks import *  # noqa: E402, F403  (dead-letter queue test tasks)
from tests.testapp.fail_tasks import *  # noqa: E402, F403  (failure-pipeline test tasks)


@shared_task(bind=True)
def beat_job(self, sleep_ms: int = 0) -> None:
    """A periodic task for the beat tests: records the slot key it was fired for."""
    beat = ((self.request.headers or {}).get("celery_guard") or {}).get("beat") or {}
    started = time.time()
    if sleep_ms:
        time.sleep(sleep_ms / 1000)
    Execution.objects.create(
        task=self.name,
        label=beat.get("key") or "",
        queue=(self.request.delivery_info or {}).get("routing_key") or "",
        hostname=self.request.hostname or "",
        guard_header=beat or None,
        started_at=started,
        finished_at=time.time(),
    )


from tests.testapp import idem_tasks  # noqa: E402, F401  (registers the idempotency test tasks)


@guarded_task(bind=True, name="tests.testapp.tasks.beat_guarded_job")
def beat_guarded_job(self) -> None:
    """A guarded periodic task: the beat's slot key becomes its idempotency key."""
    record(self, self.request.headers["celery_guard"]["beat"]["key"])


from tests.testapp import (  # noqa: E402  (register the observability and bulk-run test tasks)
    obs_tasks,  # noqa: F401
    run_tasks,  # noqa: F401
)
from tests.testapp.limit_tasks import *  # noqa: E402, F403  (limits test tasks)
from tests.testapp.outbox_tasks import *  # noqa: E402, F403  (delivery test tasks)
