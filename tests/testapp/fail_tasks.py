"""Tasks of the failure-pipeline tests (``fail_`` prefix); each records its executions."""

import os
import signal
import time

import requests
from celery import shared_task

from celery_guard import PermanentError, guarded_task
from celery_guard.backoff import Exponential
from tests.testapp.models import Execution
from tests.testapp.tasks import record


def http_error(status: int, retry_after: str | None = None) -> requests.HTTPError:
    """A real ``requests`` HTTP error carrying a response."""
    response = requests.Response()
    response.status_code = status
    if retry_after is not None:
        response.headers["Retry-After"] = retry_after
    return requests.HTTPError(f"{status} from the test API", response=response)


@guarded_task(bind=True, max_attempts=4, backoff=Exponential(base=0.2, factor=2, cap=0.5))
def fail_flaky(self, label: str, fail_times: int) -> None:
    record(self, label)
    if self.request.retries < fail_times:
        raise ConnectionError(f"flaky {self.request.retries}")


@guarded_task(bind=True)
def fail_permanent(self, label: str) -> None:
    record(self, label)
    raise ValueError(f"bad input {label}")


@guarded_task(bind=True, max_attempts=3, backoff=0.1)
def fail_always(self, label: str) -> None:
    record(self, label)
    raise TimeoutError("upstream timed out")


@guarded_task(bind=True, max_attempts=10, backoff=0.6, deadline=1.5)
def fail_deadline(self, label: str) -> None:
    record(self, label)
    raise ConnectionError("still down")


@guarded_task(bind=True, max_attempts=3, backoff=0.05)
def fail_retry_after(self, label: str) -> None:
    record(self, label)
    if self.request.retries == 0:
        raise http_error(503, retry_after="1")


@guarded_task(bind=True, max_attempts=1, backoff=0.05)
def fail_throttled(self, label: str, times: int) -> None:
    record(self, label)
    if self.request.retries < times:
        raise http_error(429, retry_after="0.2")


@guarded_task(bind=True, max_attempts=3, backoff=0.1, soft_time_limit=0.3)
def fail_soft_limit(self, label: str) -> None:
    record(self, label)  # before a body that may never return
    if self.request.retries == 0:
        time.sleep(5)


@guarded_task(bind=True, max_attempts=2, backoff=0.1, time_limit=1)
def fail_hard_limit(self, label: str) -> None:
    record(self, label)  # before a body that may never return
    time.sleep(10)


@guarded_task(bind=True)
def fail_note_redelivery(self, label: str, sleep_ms: int = 0) -> None:
    redelivered = (self.request.delivery_info or {}).get("redelivered")
    record(self, f"{label}:redelivered" if redelivered else label, sleep_ms)


@guarded_task(bind=True)
def fail_kill_self(self, label: str) -> None:
    record(self, label)  # before a body that may never return
    os.kill(os.getpid(), signal.SIGKILL)


@guarded_task(bind=True, give_up_on=(LookupError,))
def fail_until_fixed(self, label: str, count: int = 1) -> None:
    if not Execution.objects.filter(label=f"fixed:{label}").exists():
        raise PermanentError(f"{label} is not fixed yet")
    record(self, label)


@shared_task(bind=True)
def fail_unguarded(self, label: str) -> None:
    raise RuntimeError(f"unguarded {label}")


@guarded_task(bind=True)
def fail_nul(self, label: str, text: str) -> None:
    record(self, label)
    raise ValueError(f"bad input {text}")


@guarded_task(bind=True, max_attempts=3, backoff=0.1)
def fail_down(self, label: str) -> None:
    record(self, label)
    raise ConnectionError("upstream down")
