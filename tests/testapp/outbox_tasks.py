"""Tasks of the delivery tests (``outbox_``/``sched_`` prefixes); each records its runs."""

from celery_guard import guarded_task
from celery_guard.backoff import Fixed
from tests.testapp.tasks import record


@guarded_task(bind=True, outbox=True)
def outbox_job(self, label: str) -> None:
    record(self, label)


@guarded_task(bind=True, outbox=True, idempotency_key="receipt:{order_id}")
def outbox_receipt(self, order_id: int) -> None:
    record(self, f"receipt-{order_id}")


@guarded_task(bind=True, max_attempts=3, backoff=Fixed(1))
def sched_flaky(self, label: str) -> None:
    record(self, label)
    if self.request.retries == 0:
        raise ConnectionError("flaky gateway")


@guarded_task(bind=True, max_attempts=3)
def sched_throttled(self, label: str) -> None:
    # Imported here: fail_tasks imports tests.testapp.tasks, which imports this module.
    from tests.testapp.fail_tasks import http_error

    record(self, label)
    if self.request.retries == 0:
        raise http_error(429, retry_after="2")


@guarded_task(bind=True)
def sched_job(self, label: str) -> None:
    record(self, label)
