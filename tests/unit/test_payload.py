"""Unit tests of the enqueue-time payload checks (pure module)."""

import datetime
import decimal

import pytest

from celery_guard import PayloadError
from celery_guard.core.payload import check, refuse


def test_plain_json_passes_and_reports_size():
    size = check(
        (1, "a", None, True, 1.5), {"nested": {"list": [1, [2, {"k": "v"}]]}}, max_bytes=1000
    )
    assert size == len('[[1,"a",null,true,1.5],{"nested":{"list":[1,[2,{"k":"v"}]]}}]')


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (
            (),
            {"user": {"joined": datetime.datetime(2024, 1, 1)}},
            "kwargs['user']['joined']: datetime is not JSON serializable",
        ),
        ((1, [2, decimal.Decimal("1.5")]), {}, "args[1][1]: Decimal is not JSON serializable"),
        ((), {"when": float("nan")}, "kwargs['when']: nan is not valid JSON"),
        ((), {"ids": {1: "a"}}, "kwargs['ids']: dict key 1 is int"),
        (({1, 2},), {}, "args[0]: set is not JSON serializable"),
        ((object(),), {}, "args[0]: object is not JSON serializable"),
    ],
)
def test_not_plain_json_names_the_path(args, kwargs, message):
    with pytest.raises(PayloadError) as excinfo:
        check(args, kwargs, max_bytes=10_000)
    assert str(excinfo.value).startswith(message)


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (("a\x00b",), {}, "args[0]: contains a NUL character"),
        ((), {"ids": {"k\x00": 1}}, "kwargs['ids']: dict key 'k\\x00': contains a NUL character"),
        ((), {"k\x00": 1}, "kwargs: key 'k\\x00': contains a NUL character"),
    ],
)
def test_nul_is_accepted_at_enqueue_and_refused_on_request(args, kwargs, message):
    check(args, kwargs, max_bytes=10_000)  # a dead letter stores it escaped
    with pytest.raises(PayloadError) as excinfo:
        check(args, kwargs, max_bytes=10_000, refuse_nul=True)
    assert str(excinfo.value).startswith(message)


def test_payload_error_is_a_value_error():
    assert issubclass(PayloadError, ValueError)


def test_circular_structure_is_reported_not_recursed_forever():
    loop: list = []
    loop.append(loop)
    with pytest.raises(PayloadError, match="nested more than 100 levels"):
        check((loop,), {}, max_bytes=10_000)


def test_size_limit_counts_the_encoded_bytes():
    assert check(("é" * 10,), {}, max_bytes=1000) > 0
    with pytest.raises(
        PayloadError, match=r"payload is \d+ bytes, over CELERY_GUARD_MAX_PAYLOAD_BYTES \(50\)"
    ):
        check(("x" * 100,), {}, max_bytes=50)


def test_args_and_kwargs_must_be_containers():
    with pytest.raises(PayloadError, match="args: expected a list or tuple, got str"):
        check("abc", {}, max_bytes=100)
    with pytest.raises(PayloadError, match="kwargs: expected a dict, got list"):
        check((), [1], max_bytes=100)


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ((), {"user": {"joined": datetime.datetime(2024, 1, 1)}}),
        ((1, [2, decimal.Decimal("1.5")]), {}),
        ((), {"when": float("nan")}),
        ((float("inf"),), {}),
        ((), {"ids": {1: "a"}}),
        ((object(),), {}),
        ("abc", {}),
        ((), [1]),
    ],
)
def test_refuse_refuses_what_check_refuses_with_the_same_message(args, kwargs):
    with pytest.raises(PayloadError) as checked:
        check(args, kwargs, max_bytes=10_000)
    with pytest.raises(PayloadError) as refused:
        refuse(args, kwargs, max_bytes=10_000)
    assert str(refused.value) == str(checked.value)


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        (("x" * 60,), {}),
        (("é" * 30,), {}),
        (("\U0001f600" * 10,), {}),  # a surrogate pair per character: 12 bytes each
        ((2**400,), {}),
        ((), {"k" * 60: 1}),
        ((1.5e-308, -2.2250738585072014e-308, True, None), {"a": "b"}),
    ],
)
def test_refuse_admits_exactly_what_fits(args, kwargs):
    size = check(args, kwargs, max_bytes=10_000)
    refuse(args, kwargs, max_bytes=size)  # fits exactly: admitted, by bound or by encoding
    with pytest.raises(PayloadError, match=rf"payload is {size} bytes"):
        refuse(args, kwargs, max_bytes=size - 1)


def test_refuse_admits_small_scalar_calls_without_encoding(monkeypatch):
    from celery_guard.core import payload

    def no_encoding(*a, **kw):
        raise AssertionError("encoded")

    monkeypatch.setattr(payload, "check", no_encoding)
    refuse((1, "a" * 50, None, True, 2.5, -(2**70)), {"k": "v"}, max_bytes=10_000)
    refuse(None, None, max_bytes=100)
    with pytest.raises(AssertionError):
        refuse(([1],), {}, max_bytes=10_000)  # a container: the full check
