"""Unit tests of the event catalogue, emit, the structured logs and the request context."""

from __future__ import annotations

import ast
import io
import json
import logging
from pathlib import Path

import pytest

from celery_guard.core.pipeline import Publish
from celery_guard.middleware import RequestIdMiddleware
from celery_guard.observability import context, events, logs
from celery_guard.observability.step import ObservabilityStep

PACKAGE = Path(__file__).resolve().parents[2] / "celery_guard"


def emitted_names() -> set[tuple[str, str]]:
    """Every ``emit("name", ...)`` / ``events.emit("name", ...)`` in the package's source."""
    found = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name != "emit" or not node.args:
                continue
            first = node.args[0]
            assert isinstance(first, ast.Constant), f"{path}:{node.lineno}: emit(name) literal"
            found.add((first.value, f"{path.relative_to(PACKAGE)}:{node.lineno}"))
    return found


def test_every_emitted_event_is_in_the_catalogue():
    found = emitted_names()
    assert len(found) >= 15  # the scan finds the decision points
    unknown = sorted(where for name, where in found if name not in events.CATALOGUE)
    assert unknown == []


def test_the_catalogue_names_the_issue_events_and_no_field_clashes_with_log_records():
    wanted = {
        "enqueued",
        "deduplicated",
        "started",
        "succeeded",
        "retry_scheduled",
        "throttled",
        "deferred",
        "dead_lettered",
        "replayed",
        "lease_acquired",
        "lease_lost",
        "slot_fired",
        "run_progress",
    }
    assert wanted <= set(events.CATALOGUE)
    for event in events.CATALOGUE.values():
        assert not set(event.fields) & logs.RESERVED, event.name
    assert not set(events.CONTEXT_FIELDS) & logs.RESERVED


@pytest.fixture
def bus():
    """Only the subscribers a test adds (the app's own are put back after)."""
    saved = events._bus.subscribers
    events._bus.subscribers = ()
    yield events
    events._bus.subscribers = saved


def test_emit_without_subscribers_does_nothing_at_all(bus):
    # Not even the name lookup: the hot path when nobody listens is one attribute read.
    bus.emit("no-such-event", x=1)


def test_unknown_events_are_refused_and_a_failing_subscriber_does_not_stop_others(bus):
    seen = []

    def broken(event, fields):
        raise RuntimeError("subscriber bug")

    bus.subscribe(broken, uid="broken")
    bus.subscribe(lambda e, f: seen.append((e.name, dict(f))), uid="ok")
    with pytest.raises(events.UnknownEvent):
        bus.emit("no-such-event")
    bus.emit("lease_acquired", lock="l", holder="h", token=3)
    assert seen == [("lease_acquired", {"lock": "l", "holder": "h", "token": 3})]


def test_events_of_a_run_carry_its_context_and_one_outcome(bus):
    seen = []
    bus.subscribe(lambda e, f: seen.append((e.name, dict(f))), uid="t")
    run = context.Run("id-1", "app.job", "q", 2, "acme", context.Origin("rid", "7"))
    with context.bind_run(run):
        bus.emit("retry_scheduled", error_class="E", kind="transient", delay=1.0)
        # A task enqueued from the run is another task: its events keep only the origin.
        bus.emit("enqueued", task_id="id-2", task_name="app.child", queue=None, attempt=1)
    (_, fields), (_, child) = seen
    assert run.outcome == "retry_scheduled"
    assert fields["task_id"] == "id-1" and fields["queue"] == "q" and fields["attempt"] == 2
    assert (fields["request_id"], fields["initiator"], fields["tenant"]) == ("rid", "7", "acme")
    assert fields["duration"] >= 0
    assert (child["task_id"], child["request_id"], child.get("tenant")) == ("id-2", "rid", None)


def test_log_record_has_the_fields_in_extra_and_the_json_formatter_writes_them(bus):
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger("celery_guard")
    old_level, old_propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    bus.subscribe(logs.log_event, uid="logs")
    try:
        run = context.Run("id-9", "app.job", "q", 1, None, context.Origin("rid-9", None))
        with context.bind_run(run):
            bus.emit("dead_lettered", reason="exhausted", error_class="x.E", attempts_used=3)
        logger.setLevel(logging.CRITICAL)  # disabled level: no record at all
        bus.emit("lease_lost", lock="l", holder="h", why="test")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        logger.propagate = old_propagate
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["event"] == "dead_lettered"
    assert record["task_id"] == "id-9" and record["request_id"] == "rid-9"
    assert record["reason"] == "exhausted" and record["error_class"] == "x.E"
    assert record["levelname"] == "ERROR"
    assert "initiator" not in record  # fields without a value are left out


def test_idempotency_keys_are_only_logged_hashed():
    assert events.key_hash("invoice:42") == events.key_hash("invoice:42")
    assert "invoice" not in (events.key_hash("invoice:42") or "")
    assert events.key_hash(None) is None


class _Task:
    name = "app.job"
    guard_options: dict = {}


def _prepare(inherited=None) -> dict:
    publish = Publish(_Task(), (), {}, {}, inherited=inherited or {})
    ObservabilityStep().prepare(publish)
    return publish.fields


def test_prepare_stamps_the_origin_and_children_of_a_run_keep_the_parents_request_id():
    assert _prepare() == {"request": None}
    with context.bind_origin(context.Origin("rid-1", lambda: "42")):
        assert _prepare() == {"request": {"id": "rid-1", "initiator": "42"}}
    parent = context.origin_from_header({"id": "rid-2", "initiator": "5"})
    with context.bind_run(context.Run("t", "n", "q", 1, None, parent)):
        assert _prepare() == {"request": {"id": "rid-2", "initiator": "5"}}
    # A retry keeps the origin it already carries.
    assert _prepare({"request": {"id": "old"}}) == {}


def test_middleware_takes_a_clean_request_id_or_makes_one(rf):
    seen = []

    def view(request):
        seen.append(context.origin().request_id)
        from django.http import HttpResponse

        return HttpResponse("ok")

    middleware = RequestIdMiddleware(view)
    response = middleware(rf.get("/", HTTP_X_REQUEST_ID="abc-123"))
    assert seen[-1] == "abc-123" and response["X-Request-ID"] == "abc-123"
    response = middleware(rf.get("/", HTTP_X_REQUEST_ID="bad id\nwith newline"))
    assert seen[-1] != "bad id\nwith newline" and len(seen[-1]) == 32
    assert response["X-Request-ID"] == seen[-1]
    assert context.origin() is None
