"""The reference pages agree with the code: settings (type, default), check ids, commands,
signals, events, models and public names are all documented."""

from __future__ import annotations

import argparse
import ast
import inspect
import re
from pathlib import Path
from typing import Any

from celery.utils.imports import symbol_by_name
from django.dispatch import Signal

import celery_guard
from celery_guard import backoff, conf, signals
from celery_guard import models as celery_guard_models
from celery_guard.management.commands.celery_guard import Command
from celery_guard.observability import events

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PACKAGE = ROOT / "celery_guard"


def _text(name: str) -> str:
    return (DOCS / name).read_text()


def _all_docs() -> str:
    return "\n".join(path.read_text() for path in sorted(DOCS.glob("*.md")))


def test_every_setting_is_in_the_settings_reference():
    documented = set(re.findall(r"`(CELERY_GUARD_[A-Z0-9_]+)`", _text("settings.md")))
    missing = sorted(conf.known_settings() - documented)
    assert missing == [], f"settings missing from docs/settings.md: {missing}"


def test_every_documented_setting_exists():
    documented = set(re.findall(r"^\| `(CELERY_GUARD_[A-Z0-9_]+)`", _text("settings.md"), re.M))
    unknown = sorted(documented - conf.known_settings())
    assert unknown == [], f"docs/settings.md documents settings the code does not read: {unknown}"


def _check_ids_in_code() -> set[str]:
    found: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        found.update(re.findall(r'id="(celery_guard\.[EW]\d{3})"', path.read_text()))
    return found


def test_every_check_id_is_in_the_checks_reference():
    documented = set(re.findall(r"`(celery_guard\.[EW]\d{3})`", _text("checks.md")))
    ids = _check_ids_in_code()
    assert ids, "no check ids found: the scan is broken"
    missing = sorted(ids - documented)
    assert missing == [], f"check ids missing from docs/checks.md: {missing}"


def test_every_subcommand_is_documented():
    parser = argparse.ArgumentParser()
    Command().add_arguments(parser)
    [subparsers] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    names = set(subparsers.choices)
    assert {"doctor", "replay", "purge"} <= names
    docs = _all_docs()
    missing = sorted(n for n in names if f"celery_guard {n}" not in docs)
    assert missing == [], f"manage.py celery_guard subcommands not in the docs: {missing}"


# --- settings: type and default -------------------------------------------------------------


def _settings_rows() -> tuple[list[str], list[list[str]]]:
    """The header and the rows of the settings table (the first table of docs/settings.md)."""
    header: list[str] = []
    rows: list[list[str]] = []
    for line in _text("settings.md").splitlines():
        if not line.startswith("|"):
            if rows:
                break
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if not header:
            header = cells
        elif not set("".join(cells)) <= set("-: "):
            rows.append(cells)
    return header, rows


def _literal(cell: str) -> Any:
    """The Python value of a default cell's first code span (``Exponential()`` included)."""
    match = re.match(r"`([^`]*)`", cell)
    assert match, f"no code span in the default cell {cell!r}"
    source = match.group(1)
    call = re.fullmatch(r"([A-Z]\w*)\(\)", source)
    if call:
        return getattr(backoff, call.group(1))()
    return ast.literal_eval(source)


def test_the_settings_table_gives_a_type_and_a_default_for_every_setting():
    header, rows = _settings_rows()
    assert header[:3] == ["setting", "type", "default"], header
    assert len(rows) >= len(conf.DEFAULTS)
    for cells in rows:
        name, kind, default = cells[0].strip("`"), cells[1], cells[2]
        assert kind, f"{name}: no type in docs/settings.md"
        assert default, f"{name}: no default in docs/settings.md"


def test_the_documented_defaults_are_the_defaults_of_the_code():
    _, rows = _settings_rows()
    wrong = []
    for cells in rows:
        name = cells[0].strip("`").removeprefix(conf.PREFIX)
        value, expected = _literal(cells[2]), conf.DEFAULTS[name]
        if value != expected or type(value) is not type(expected):
            wrong.append(f"{name}: docs say {value!r}, conf has {expected!r}")
    assert wrong == [], "docs/settings.md defaults differ from conf.DEFAULTS:\n" + "\n".join(wrong)


# --- autodoc coverage: public names, signals, models ----------------------------------------


def _directives() -> dict[str, set[str] | None]:
    """Each autodoc target of docs/reference.md -> its ``:members:`` (None: all members)."""
    found: dict[str, set[str] | None] = {}
    target = ""
    for line in _text("reference.md").splitlines():
        directive = re.match(r"\.\. auto\w+:: (\S+)", line.strip())
        if directive:
            target = directive.group(1)
            found[target] = set()
            continue
        members = re.match(r":members:(.*)", line.strip())
        if members and target:
            names = {m.strip() for m in members.group(1).split(",") if m.strip()}
            found[target] = names or None
    return found


def _rendered(path: str, obj: object) -> bool:
    """Whether an autodoc directive of docs/reference.md renders ``obj`` (found at ``path``)."""
    directives = _directives()
    paths = {path}
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if isinstance(module, str) and isinstance(qualname, str):
        paths.add(f"{module}.{qualname}")
    for candidate in paths:
        if candidate in directives:
            return True
        parent, _, name = candidate.rpartition(".")
        members = directives.get(parent, set())
        if members is not None and name in members:
            return True
        # A bare `:members:` renders what the module defines with a docstring, not its data.
        if members is None and candidate != path and inspect.getdoc(obj):
            return True
    return False


def _public_paths() -> set[str]:
    """Every Python name docs/api.md lists (``celery_guard.x.Name``; bare names after one)."""
    section = _text("api.md").split("## Python", 1)[1].split("\n## ", 1)[0]
    paths = {f"celery_guard.{name}" for name in celery_guard.__all__ if name != "__version__"}
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        prefix = ""
        for span in re.findall(r"`([^`]+)`", line.split("|")[1]):
            head = re.match(r"[\w.]+", span)
            if not head:
                continue
            dotted = head.group(0)
            if dotted.startswith("celery_guard."):
                prefix = dotted.rpartition(".")[0]
                paths.add(dotted)
            elif prefix and dotted.isidentifier():
                paths.add(f"{prefix}.{dotted}")
    return paths


def test_every_public_name_is_rendered_in_the_api_reference():
    paths = _public_paths()
    assert {"celery_guard.guarded_task", "celery_guard.runs.cancel"} <= paths, "parse is broken"
    missing = sorted(p for p in paths if not _rendered(p, symbol_by_name(p)))
    assert missing == [], f"public names docs/api.md lists but docs/reference.md omits: {missing}"


def _in_code_span(name: str, text: str) -> bool:
    return re.search(rf"`[^`\n]*\b{name}\b[^`\n]*`", text) is not None


def test_every_signal_is_rendered_and_listed():
    found = {n: o for n, o in vars(signals).items() if isinstance(o, Signal)}
    assert found, "no signals found: the scan is broken"
    api = _text("api.md")
    missing = sorted(
        name
        for name, signal in found.items()
        if not _rendered(f"celery_guard.signals.{name}", signal) or not _in_code_span(name, api)
    )
    assert missing == [], f"signals not in docs/reference.md and docs/api.md: {missing}"


def test_every_model_is_rendered_and_listed():
    from django.apps import apps

    found = list(apps.get_app_config("celery_guard").get_models())
    assert len(found) >= 10, "too few models found: the scan is broken"
    api = _text("api.md")
    missing = sorted(
        model.__name__
        for model in found
        if not _rendered(f"celery_guard.models.{model.__name__}", model)
        or not _in_code_span(model.__name__, api)
        or model.__name__ not in celery_guard_models.__all__
    )
    assert missing == [], (
        f"models not in celery_guard.models.__all__, the reference or api.md: {missing}"
    )


# --- events ---------------------------------------------------------------------------------


def test_every_event_is_in_the_events_table_and_no_other():
    table = re.findall(
        r"^\| `([a-z_]+)` \| (?:DEBUG|INFO|WARNING|ERROR)", _text("observability.md"), re.M
    )
    assert len(table) == len(set(table)), "an event is listed twice in docs/observability.md"
    missing = sorted(set(events.CATALOGUE) - set(table))
    unknown = sorted(set(table) - set(events.CATALOGUE))
    assert missing == [], f"events missing from docs/observability.md: {missing}"
    assert unknown == [], f"docs/observability.md lists events the catalogue lacks: {unknown}"
