"""The reference pages agree with the code: every setting, check id and command is documented."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from celery_guard import conf
from celery_guard.management.commands.celery_guard import Command

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
