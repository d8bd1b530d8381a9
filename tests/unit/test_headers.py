"""The guard header check: its fast path for well-formed headers answers as the full check."""

import math
from collections import OrderedDict

import pytest

from celery_guard.core import headers

WELL_FORMED = [
    headers.stamp(None, retries=0, priority="default"),
    headers.stamp(None, retries=0, priority="high", request={"id": "a" * 32, "initiator": "u:1"}),
    headers.stamp(
        None,
        retries=2,
        priority="low",
        tenant="acme",
        idempotency={"key": "k:1", "fingerprint": "f" * 64, "window": 600, "on_conflict": "raise"},
        consumed=2,
        throttled=1,
        history=[{"attempt": 1, "error": "boom", "at": 1.5}],
        delay=3.5,
        replay_of=7,
        beat={"entry": "e", "slot": 1.0, "token": 3, "key": "b:1"},
        run={"run": 1, "item": 2},
    ),
    {},
    {"v": 1, "attempt": 1, "first_enqueued_at": 0},
]

CORRUPT = [
    {"attempt": True},
    {"attempt": -1},
    {"attempt": 1.0},
    {"attempt": 2**31},
    {"consumed": None},
    {"first_enqueued_at": math.inf},
    {"first_enqueued_at": -1.0},
    {"first_enqueued_at": "now"},
    {"delay": -0.5},
    {"delay": math.nan},
    {"history": "x"},
    {"history": [{"error": "a\x00b"}]},
    {"tenant": "t" * 256},
    {"priority": 3},
    {"replay_of": True},
    {"replay_of": 0},
    {"replay_of": 2**63},
    {"idempotency": "k"},
    {"idempotency": {"key": ""}},
    {"idempotency": {"key": "k", "window": math.inf}},
    {"idempotency": {"key": "k", "on_conflict": "maybe"}},
    {"request": {"id": "a\x00"}},
    {"request": {"i\x00d": "a"}},
    {"run": {"run": math.nan}},
    {"beat": [1, [2, [3, math.inf]]]},
]


def _deep(levels):
    value: dict = {}
    for _ in range(levels):
        value = {"x": value}
    return value


CORRUPT.append({"deep": _deep(25)})
CORRUPT.append({"deep": _deep(20) | {"attempt": "1"}})


@pytest.mark.parametrize("guard", WELL_FORMED)
def test_a_header_the_guard_writes_takes_the_fast_path(guard):
    assert headers._well_formed(guard)
    assert headers.problems(guard) == []
    assert headers._problems(guard) == []


@pytest.mark.parametrize("guard", CORRUPT)
def test_a_corrupt_header_is_refused_with_the_full_check_s_reasons(guard):
    assert not headers._well_formed(guard)
    assert headers.problems(guard) == headers._problems(guard) != []


@pytest.mark.parametrize("guard", WELL_FORMED + CORRUPT)
def test_the_fast_path_never_changes_the_answer(guard):
    assert headers.problems(guard) == headers._problems(guard)
    assert headers.problems(OrderedDict(guard)) == headers._problems(guard)


def test_nesting_at_the_limit_is_decided_like_the_full_check():
    for levels in range(17, 24):
        guard = {"deep": _deep(levels)}
        assert headers.problems(guard) == headers._problems(guard)
        assert bool(headers._problems(guard)) == (not headers._well_formed(guard))


def test_read_takes_any_mapping_and_folds_in_the_version_1_beat_headers():
    guard = {"v": 2, "attempt": 1}
    assert headers.read({headers.HEADER: guard}) is guard
    assert headers.read({headers.HEADER: OrderedDict(guard)}) == guard
    assert headers.read({headers.HEADER: "corrupt"}) == {}
    assert headers.read({"id": "x"}) == {}
    assert headers.read(None) == {}
    legacy = {
        headers.LEGACY_BEAT_HEADER: OrderedDict(entry="e", slot=1.0),
        headers.LEGACY_BEAT_KEY_HEADER: "b:1",
    }
    assert headers.read(legacy) == {headers.BEAT: {"entry": "e", "slot": 1.0, "key": "b:1"}}
    assert headers.read({**legacy, headers.HEADER: guard}) == {
        **guard,
        headers.BEAT: {"entry": "e", "slot": 1.0, "key": "b:1"},
    }
    beat = {headers.BEAT: {"entry": "new"}}
    assert headers.read({**legacy, headers.HEADER: beat}) == beat
