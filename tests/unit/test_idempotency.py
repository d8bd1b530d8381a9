"""Idempotency keys: derivation, validation at decoration and enqueue, namespacing, options."""

from datetime import timedelta

import pytest

from celery_guard import IdempotencyKeyError, guarded_task
from celery_guard.idempotency import keys
from tests.testapp import idem_tasks


def identify(task, *args, per_call=None, **kwargs):
    return keys.identify(task, args, kwargs, per_call or {})


def test_template_is_formatted_from_positional_keyword_and_default_arguments():
    by_position = identify(idem_tasks.idem_notify, 7, "v2")
    by_keyword = identify(idem_tasks.idem_notify, event_version="v2", employee_id=7, note="")
    assert by_position.key == "tests.testapp.idem_tasks.idem_notify:notify:7:v2"
    assert by_keyword == by_position  # defaults applied: same key and fingerprint
    assert by_position.window == 6 * 3600
    assert identify(idem_tasks.idem_notify, 7, "v2", note="x").fingerprint != (
        by_position.fingerprint
    )
    assert identify(idem_tasks.idem_notify, 7, "v3").key != by_position.key


def test_bound_task_self_is_not_a_parameter_and_callable_keys_get_the_arguments():
    seen = {}

    def key(employee_id, event_version, note):
        seen.update(employee_id=employee_id, event_version=event_version, note=note)
        return f"n-{employee_id}"

    task = idem_tasks.idem_notify
    identity = identify(task, 7, "v1", per_call={"idempotency_key": keys.KeySpec(key)})
    assert identity.key == f"{task.name}:n-7"
    assert seen == {"employee_id": 7, "event_version": "v1", "note": ""}


@pytest.mark.parametrize(
    ("call", "message"),
    [
        ((None, "v1"), r"no value for 'employee_id'"),
        ((7, ""), r"no value for 'event_version'"),
        ((), r"missing a required argument: 'employee_id'"),
    ],
)
def test_missing_values_raise_idempotency_key_error(call, message):
    with pytest.raises(IdempotencyKeyError, match=message):
        identify(idem_tasks.idem_notify, *call)


def test_empty_or_non_string_callable_keys_raise():
    task = idem_tasks.idem_notify
    for bad, message in [("  ", "is empty"), (None, "must be a str"), (b"x", "must be a str")]:
        spec = keys.KeySpec(lambda **kw: bad)  # noqa: B023
        with pytest.raises(IdempotencyKeyError, match=message):
            identify(task, 1, "v", per_call={"idempotency_key": spec})


def test_unknown_template_field_fails_at_decoration():
    with pytest.raises(ValueError) as exc:

        @guarded_task(idempotency_key="notify:{employe_id}:{event_version}")
        def notify(employee_id: int, event_version: str) -> None: ...

    assert str(exc.value) == (
        "@guarded_task option 'idempotency_key': template 'notify:{employe_id}:{event_version}' "
        "uses 'employe_id', which is not a parameter of "
        "test_unknown_template_field_fails_at_decoration.<locals>.notify(employee_id, "
        "event_version) (did you mean 'employee_id'?)"
    )


def test_bound_task_self_is_not_a_template_field():
    with pytest.raises(ValueError, match="uses 'self', which is not a parameter"):

        @guarded_task(bind=True, idempotency_key="x:{self}")
        def job(self, n: int) -> None: ...


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        ("", ValueError, "must not be empty"),
        ("x:{}", ValueError, "positional field"),
        ("x:{0}", ValueError, "positional field"),
        ("x:{n", ValueError, "expected '}'"),
        (42, TypeError, "expected a key template"),
    ],
)
def test_invalid_key_option_values(value, error, message):
    with pytest.raises(error, match=f"option 'idempotency_key': .*{message}"):
        guarded_task(idempotency_key=value)


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"dedup_window": 0}, ValueError, "option 'dedup_window': must be a positive number"),
        ({"dedup_window": "1h"}, TypeError, "option 'dedup_window': expected a timedelta"),
        ({"dedup_window": True}, TypeError, "option 'dedup_window': expected a timedelta"),
        ({"idempotency_conflict": "warn"}, ValueError, "expected 'raise' or 'ignore'"),
    ],
)
def test_invalid_window_and_conflict_options(options, error, message):
    with pytest.raises(error, match=message):
        guarded_task(idempotency_key="k", **options)


def test_var_keyword_tasks_accept_any_field_and_flatten_kwargs():
    @guarded_task(idempotency_key="k:{order}", dedup_window=timedelta(minutes=5))
    def job(**fields) -> None: ...

    assert identify(job, order=5).key == f"{job.name}:k:5"
    assert identify(job, order=5).window == 300
    with pytest.raises(IdempotencyKeyError, match="no value for 'order'"):
        identify(job, other=1)


def test_per_call_key_is_literal_and_window_overridable():
    task = idem_tasks.idem_notify
    identity = identify(task, 1, "v", per_call={"idempotency_key": "order-9", "dedup_window": 5.0})
    assert identity.key == f"{task.name}:order-9"
    assert identity.window == 5.0


def test_tasks_without_a_key_have_no_identity():
    from tests.testapp import tasks

    assert identify(tasks.high_job, "x") is None


def test_namespacing_and_hashing():
    name = "app.tasks.notify"
    assert keys.namespaced(name, "a:1") == "app.tasks.notify:a:1"
    hashed = keys.namespaced(name, "a b*")
    assert hashed.startswith("app.tasks.notify:#") and len(hashed) == len(name) + 2 + 64
    long_key = keys.namespaced(name, "x" * 500)
    assert len(long_key) <= keys.MAX_KEY_LENGTH and "#" in long_key
    # The same raw key in two namespaces, hashed or not, never collides.
    assert keys.namespaced("a", "k") != keys.namespaced("b", "k")
    assert keys.namespaced("a", "b:k") != keys.namespaced("a:b", "k")
    odd = keys.namespaced("weird name:with*", "k")
    assert odd.startswith("#") and odd.endswith(":k") and "*" not in odd
    for key in (hashed, long_key, odd):
        assert not set(key) & set("*?[]\\ {}")


def test_fingerprint_is_canonical():
    assert keys.fingerprint({"a": 1, "b": [1, 2]}) == keys.fingerprint({"b": [1, 2], "a": 1})
    assert keys.fingerprint({"a": 1}) != keys.fingerprint({"a": "1"})


def test_callable_key_must_accept_the_task_arguments_at_decoration():
    with pytest.raises(ValueError, match=r"option 'idempotency_key': callable .* must accept"):

        @guarded_task(idempotency_key=lambda employee_id: str(employee_id))
        def notify(employee_id: int, event_version: str) -> None: ...

    @guarded_task(idempotency_key=lambda employee_id, **rest: f"n:{employee_id}")
    def notify_ok(employee_id: int, event_version: str) -> None: ...

    assert identify(notify_ok, 3, "v").key == f"{notify_ok.name}:n:3"


def test_the_redis_ledger_follows_the_broker_url_per_settings(celery_conf):
    from celery import current_app
    from django.test import override_settings

    from celery_guard.idempotency import ledger

    redis_ledger = {"CELERY_GUARD_IDEMPOTENCY_BACKEND": "redis"}
    with override_settings(**redis_ledger, CELERY_GUARD_IDEMPOTENCY_REDIS_URL=None):
        assert ledger.get_ledger().url == current_app.conf.broker_url
    with override_settings(
        **redis_ledger, CELERY_GUARD_IDEMPOTENCY_REDIS_URL="redis://127.0.0.1:6379/5"
    ):
        assert ledger.get_ledger().url == "redis://127.0.0.1:6379/5"
    celery_conf(broker_url="amqp://guest@localhost//")
    with (
        override_settings(**redis_ledger, CELERY_GUARD_IDEMPOTENCY_REDIS_URL=None),
        pytest.raises(ValueError, match="CELERY_GUARD_IDEMPOTENCY_REDIS_URL"),
    ):
        ledger.get_ledger()


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ((7, "v1"), {}),
        ((7,), {"event_version": "v1"}),
        ((), {"note": "n", "employee_id": 7, "event_version": "v1"}),
        ((7, "v1", "n"), {}),
        ((7, "v1", "n", "extra"), {}),  # too many
        ((7,), {"employee_id": 8, "event_version": "v1"}),  # twice
        ((7, "v1"), {"unknown": 1}),
        ((7,), {}),  # missing
    ],
)
def test_binding_a_plain_signature_matches_signature_bind(args, kwargs):
    import inspect

    from celery_guard.core import templates

    task = idem_tasks.idem_notify
    signature = inspect.signature(task.run)
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as exc:
        with pytest.raises(TypeError, match=str(exc)):
            templates.bind_arguments(task, args, kwargs)
        return
    bound.apply_defaults()
    arguments = templates.bind_arguments(task, args, kwargs)
    assert arguments == dict(bound.arguments)
    assert list(arguments) == list(bound.arguments)  # in the parameters' order
