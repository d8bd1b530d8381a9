"""Helpers of the system-check tests: run every feature's check of one id."""

from __future__ import annotations

from django.core.checks import CheckMessage

from celery_guard import checks


def check_setting_values() -> list[CheckMessage]:
    """Every feature's E001 check (one per feature's settings), run together."""
    return [
        message
        for check in checks.ALL
        if check.__name__ == "check_setting_values"
        for message in check()
    ]
