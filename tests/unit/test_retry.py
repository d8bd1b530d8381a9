"""Failure policy units: the classifier table, Retry-After, backoff policies and decisions."""

import datetime as dt
import email.utils
import random
import socket

import httpx
import kombu.exceptions
import pytest
import redis
import requests
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from django.contrib.auth.models import User
from django.core.exceptions import ObjectDoesNotExist, PermissionDenied, ValidationError
from django.db import InterfaceError, OperationalError

from celery_guard import PermanentError, ThrottledError, TransientError
from celery_guard.backoff import Exponential, Fixed, Schedule, parse
from celery_guard.core import http
from celery_guard.failures import retry

NOW = 1_700_000_000.0


def requests_error(status, retry_after=None):
    response = requests.Response()
    response.status_code = status
    if retry_after is not None:
        response.headers["Retry-After"] = retry_after
    return requests.HTTPError(f"{status}", response=response)


def httpx_error(status, retry_after=None):
    request = httpx.Request("GET", "https://api.example.com/x")
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    response = httpx.Response(status, headers=headers, request=request)
    return httpx.HTTPStatusError(f"{status}", request=request, response=response)


def kind(exc, **policy):
    return retry.classify(exc, retry.Policy(**policy), now=NOW).kind


TRANSIENT = [
    ConnectionError("reset"),
    ConnectionRefusedError("refused"),
    TimeoutError("slow"),
    socket.gaierror("dns"),
    socket.herror("host"),
    kombu.exceptions.OperationalError("broker"),
    redis.ConnectionError("redis down"),
    redis.TimeoutError("redis slow"),
    OperationalError("db"),
    InterfaceError("connection already closed"),
    SoftTimeLimitExceeded(),
    TimeLimitExceeded(1),
    requests.ConnectionError("down"),
    requests.Timeout("slow"),
    requests.ReadTimeout("slow"),
    httpx.ConnectError("down"),
    httpx.ReadTimeout("slow"),
    *(requests_error(s) for s in (408, 425, 429, 500, 502, 503, 504, 599)),
    *(httpx_error(s) for s in (408, 425, 429, 500, 503)),
    TransientError("told so"),
]
PERMANENT = [
    ValueError("bad"),
    TypeError("bad"),
    KeyError("k"),
    IndexError("i"),
    LookupError("l"),
    UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad"),
    ObjectDoesNotExist(),
    User.DoesNotExist(),
    PermissionDenied(),
    ValidationError("bad"),
    *(requests_error(s) for s in (400, 401, 403, 404, 409, 410, 422)),
    *(httpx_error(s) for s in (400, 404, 422)),
    PermanentError("told so"),
]
THROTTLED = [
    requests_error(429, retry_after="3"),
    httpx_error(429, retry_after="3"),
    ThrottledError("slow down", retry_after=3),
]


@pytest.mark.parametrize("exc", TRANSIENT, ids=repr)
def test_builtin_transient(exc):
    assert kind(exc) == "transient"


@pytest.mark.parametrize("exc", PERMANENT, ids=repr)
def test_builtin_permanent(exc):
    assert kind(exc) == "permanent"


@pytest.mark.parametrize("exc", THROTTLED, ids=repr)
def test_throttled_carries_its_retry_after(exc):
    found = retry.classify(exc, retry.Policy(), now=NOW)
    assert (found.kind, found.retry_after) == ("throttled", 3.0)


def test_http_detection_is_duck_typed():
    class Response:
        status_code = 503
        headers = {"Retry-After": "7"}

    class ApiError(Exception):
        response = Response()

    found = retry.classify(ApiError(), retry.Policy(), now=NOW)
    assert (found.kind, found.rule, found.retry_after) == ("transient", "http", 7.0)
    # An httpx error without a response (its property raises) is no HTTP status.
    assert retry.http_status(httpx.ConnectError("down")) is None


def test_unknown_errors_follow_the_setting():
    assert kind(RuntimeError("?")) == "transient"
    assert kind(RuntimeError("?"), unknown="permanent") == "permanent"
    assert retry.classify(RuntimeError(), retry.Policy(), now=NOW).rule == "unknown"


class SmtpTemporaryError(ValueError):
    pass


class InvalidAddress(ConnectionError):
    pass


def test_classification_order():
    # The task's own lists come first, give_up_on before retry_on.
    assert kind(SmtpTemporaryError(), retry_on=(SmtpTemporaryError,)) == "transient"
    assert kind(InvalidAddress(), give_up_on=(InvalidAddress,)) == "permanent"
    assert kind(TransientError(), give_up_on=(TransientError,)) == "permanent"
    assert kind(InvalidAddress(), give_up_on=(InvalidAddress,), retry_on=(ConnectionError,)) == (
        "permanent"
    )

    # Then the guard's exceptions, then the project classifier, then the built-ins.
    def classifier(exc):
        return "permanent" if isinstance(exc, (ConnectionError, TransientError)) else None

    assert kind(TransientError(), classifier=classifier) == "transient"
    assert kind(ConnectionError(), classifier=classifier) == "permanent"
    assert kind(ValueError(), classifier=classifier) == "permanent"
    assert kind(TimeoutError(), classifier=classifier) == "transient"
    with pytest.raises(ValueError, match="returned 'retry'"):
        kind(ValueError(), classifier=lambda exc: "retry")


def test_retry_after_parsing():
    date = email.utils.formatdate(NOW + 120, usegmt=True)
    assert http.parse_retry_after("30", NOW) == 30.0
    assert http.parse_retry_after(" 1.5 ", NOW) == 1.5
    assert http.parse_retry_after(date, NOW) == 120.0
    assert http.parse_retry_after(email.utils.formatdate(NOW - 60, usegmt=True), NOW) == 0.0
    assert http.parse_retry_after(dt.timedelta(seconds=9), NOW) == 9.0
    when = dt.datetime.fromtimestamp(NOW + 5, dt.timezone.utc)
    assert http.parse_retry_after(when, NOW) == 5.0
    assert http.parse_retry_after(-3, NOW) == 0.0
    assert http.parse_retry_after("soon", NOW) is None
    assert http.parse_retry_after(None, NOW) is None
    assert http.retry_after_of(requests_error(503, date), NOW) == 120.0
    assert http.retry_after_of(TransientError(retry_after="4"), NOW) == 4.0
    assert http.retry_after_of(ValueError(), NOW) is None


def test_exponential_full_jitter_bounds():
    policy = Exponential(base=0.5, factor=2, cap=3)
    assert [policy.bound(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    rng = random.Random(7)
    for n in range(1, 6):
        draws = [policy.delay(n, rng) for _ in range(200)]
        assert all(0 <= d <= policy.bound(n) for d in draws)
        assert max(draws) - min(draws) > policy.bound(n) / 2  # spread over the range
    assert Exponential(base=1, jitter=False).delay(4) == 8.0
    assert Exponential(cap=10).bound(10_000) == 10.0  # no overflow
    assert policy.longest() == 3.0


def test_fixed_and_schedule():
    assert Fixed(2).delay(1) == Fixed(2).delay(9) == 2.0
    schedule = Schedule((10, 30, 120))
    assert [schedule.delay(n) for n in (1, 2, 3, 4, 5)] == [10, 30, 120, 120, 120]
    assert schedule.longest() == 120


def test_parse_backoff_values():
    assert parse(5) == Fixed(5)
    assert parse((10, 30, 120, 600)) == Schedule((10, 30, 120, 600))
    assert parse([1, 2]) == Schedule((1, 2))
    policy = Exponential(base=2)
    assert parse(policy) is policy
    for bad, error in [
        ("fast", TypeError),
        (True, TypeError),
        (-1, ValueError),
        ((), ValueError),
        ((1, -2), ValueError),
        ((1, "x"), TypeError),
        (float("inf"), ValueError),
    ]:
        with pytest.raises(error):
            parse(bad)
    with pytest.raises(ValueError, match="factor must be >= 1"):
        Exponential(factor=0.5)


def decide(classification, policy=None, **state):
    state = {"consumed_before": 0, "throttled_before": 0, "first_enqueued_at": NOW, **state}
    return retry.decide(classification, policy or retry.Policy(backoff=Fixed(1)), now=NOW, **state)


TRANSIENT_C = retry.Classification("transient", "builtin")


def test_permanent_stops_at_once():
    d = decide(retry.Classification("permanent", "builtin"))
    assert (d.retry, d.reason, d.consumed) == (False, "permanent", 1)


def test_max_attempts_counts_the_first_run():
    policy = retry.Policy(max_attempts=3, backoff=Fixed(1))
    assert decide(TRANSIENT_C, policy, consumed_before=0).retry
    assert decide(TRANSIENT_C, policy, consumed_before=1).retry
    last = decide(TRANSIENT_C, policy, consumed_before=2)
    assert (last.retry, last.reason, last.consumed) == (False, "exhausted", 3)
    assert not retry.decide(
        TRANSIENT_C,
        retry.Policy(max_attempts=1),
        consumed_before=0,
        throttled_before=0,
        first_enqueued_at=None,
        now=NOW,
    ).retry


def test_backoff_uses_the_number_of_consumed_attempts():
    policy = retry.Policy(max_attempts=9, backoff=Schedule((1, 5, 9)))
    assert [decide(TRANSIENT_C, policy, consumed_before=n).delay for n in range(4)] == [1, 5, 9, 9]


def test_retry_after_is_a_floor():
    c = retry.Classification("transient", "http", retry_after=30)
    assert decide(c).delay == 30
    c = retry.Classification("transient", "http", retry_after=0.5)
    assert decide(c).delay == 1


def test_throttled_does_not_consume_until_the_throttle_cap():
    c = retry.Classification("throttled", "http", retry_after=2)
    policy = retry.Policy(max_attempts=1, max_throttled=2, backoff=Fixed(1))
    first = decide(c, policy)
    assert (first.retry, first.consumed, first.throttled, first.delay) == (True, 0, 1, 2)
    second = decide(c, policy, throttled_before=1)
    assert (second.retry, second.consumed, second.throttled) == (True, 0, 2)
    third = decide(c, policy, throttled_before=2)  # the cap: it counts as an attempt now
    assert (third.retry, third.reason, third.consumed) == (False, "exhausted", 1)


def test_no_retry_starts_past_the_deadline():
    policy = retry.Policy(max_attempts=99, backoff=Fixed(10), deadline=60)
    assert decide(TRANSIENT_C, policy, first_enqueued_at=NOW - 49).retry
    late = decide(TRANSIENT_C, policy, first_enqueued_at=NOW - 51)
    assert (late.retry, late.reason) == (False, "deadline")
    throttled = retry.Classification("throttled", "http", retry_after=20)
    assert decide(throttled, policy, first_enqueued_at=NOW - 41).reason == "deadline"
