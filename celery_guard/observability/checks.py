"""System checks of observability: its settings (E001), SLOs (E010), metrics under prefork
(W018), rollups (W019), rollup retention against the SLO windows (W027)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

from django.core.checks import CheckMessage, Error, Warning

from celery_guard import conf
from celery_guard.conf import guard_settings
from celery_guard.core import checks as core_checks
from celery_guard.observability import alerts, metrics, slos


def setting_errors() -> Iterable[str]:
    """Errors in observability's settings (reported as ``celery_guard.E001``)."""
    yield from core_checks.duration_errors(("ROLLUP_FLUSH_SECONDS", "ROLLUP_RETENTION_DAYS"))
    url = conf.raw("ALERT_WEBHOOK_URL")
    if url is not None and not conf.is_http_url(url):
        yield f"CELERY_GUARD_ALERT_WEBHOOK_URL must be an http:// or https:// URL, got {url!r}"


check_setting_values = core_checks.setting_values_check(setting_errors)


def check_slos(app_configs: Sequence[Any] | None = None, **kw: Any) -> list[CheckMessage]:
    """E010: ``CELERY_GUARD_SLOS`` or ``CELERY_GUARD_ALERT_SINKS`` is malformed."""
    found: list[CheckMessage] = [
        Error(text, id="celery_guard.E010") for text in slos.errors(conf.raw("SLOS"))
    ]
    unknown = [name for name in guard_settings.alert_sinks if name not in alerts.SINKS]
    if unknown:
        found.append(
            Error(
                f"CELERY_GUARD_ALERT_SINKS names unknown sinks {unknown} "
                f"(known: {', '.join(alerts.SINKS)})",
                id="celery_guard.E010",
            )
        )
    return found


def check_multiprocess(app_configs: Sequence[Any] | None = None, **kw: Any) -> list[CheckMessage]:
    """W018: metrics on, but no ``PROMETHEUS_MULTIPROC_DIR``: worker counts never show."""
    if not metrics.enabled() or os.environ.get(metrics.MULTIPROC_ENV):
        return []
    return [
        Warning(
            "prometheus-client is installed and CELERY_GUARD_METRICS is on, but "
            "PROMETHEUS_MULTIPROC_DIR is not set: each worker pool process counts in its own "
            "memory and celery-guard/metrics (served by the web process) never sees it.",
            hint="Set PROMETHEUS_MULTIPROC_DIR to one empty directory for the workers and the "
            "web process of a machine (emptied at deploy), or CELERY_GUARD_METRICS = False.",
            id="celery_guard.W018",
        )
    ]


def check_rollups(app_configs: Sequence[Any] | None = None, **kw: Any) -> list[CheckMessage]:
    """W019: SLOs are set but rollups are off, so no alert can ever be raised."""
    if not guard_settings.slos or guard_settings.rollups:
        return []
    return [
        Warning(
            "CELERY_GUARD_SLOS is set but CELERY_GUARD_ROLLUPS is False: the SLOs are "
            "evaluated on the rollups, so no alert will ever be raised.",
            hint="Turn CELERY_GUARD_ROLLUPS back on, or remove CELERY_GUARD_SLOS.",
            id="celery_guard.W019",
        )
    ]


def check_retention(app_configs: Sequence[Any] | None = None, **kw: Any) -> list[CheckMessage]:
    """W027: an SLO's window reaches further back than the rollups are kept."""
    if list(setting_errors()) or list(slos.errors(conf.raw("SLOS"))):
        return []  # E001 / E010 say what is wrong first
    kept = guard_settings.rollup_retention_days * 24 * 60
    longest = [o for o in slos.objectives(guard_settings.slos) if o.window > kept]
    return [
        Warning(
            f"CELERY_GUARD_SLOS[{o.slo!r}] {o.name} is computed over a window of {o.window:g} "
            f"minutes, but CELERY_GUARD_ROLLUP_RETENTION_DAYS keeps "
            f"{guard_settings.rollup_retention_days:g} days: `celery_guard purge` deletes "
            "what the objective measures.",
            hint="Keep the rollups longer than the longest SLO window, or shorten the window.",
            id="celery_guard.W027",
        )
        for o in longest
    ]


CHECKS = (check_setting_values, check_slos, check_multiprocess, check_rollups, check_retention)
