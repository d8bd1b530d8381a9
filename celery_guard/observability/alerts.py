"""SLO alerts: evaluate ``CELERY_GUARD_SLOS`` on the rollups, raise and resolve ``Alert`` rows.

:func:`evaluate` runs periodically (the ``celery_guard.evaluate_slos`` task on beat, or
``manage.py celery_guard alerts``). A breach first opens a *pending* alert; if it still holds
``hold`` minutes later the alert *fires* once and goes to the sinks; further evaluations
while it lasts add nothing; when the figure recovers a fired alert is *resolved* (and the
sinks told), a pending one is dropped. Every state change of an alert happens here.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from django.core.mail import mail_admins
from django.db import transaction
from django.utils import timezone

from celery_guard.conf import guard_settings
from celery_guard.observability import events, providers, rollups, slos
from celery_guard.observability.models import OPEN_ALERT_STATUSES, Alert, AlertStatus

logger = logging.getLogger(__name__)

SINKS = ("log", "mail", "sentry", "webhook")
WEBHOOK_TIMEOUT = 5.0


@dataclass
class Summary:
    """What one evaluation did."""

    raised: list[Alert] = field(default_factory=list)
    resolved: list[Alert] = field(default_factory=list)
    pending: int = 0
    values: dict[str, float | None] = field(default_factory=dict)


def measure(objective: slos.Objective, now: dt.datetime) -> float | None:
    """The objective's figure over its window ending at ``now`` (``None``: no data)."""
    since = now - dt.timedelta(minutes=objective.window)
    if objective.name == "progress_within":
        return providers.run_stall(objective.subject, now)
    if objective.name == "fire_within":
        return providers.slot_lateness(objective.subject, since, now)
    found = rollups.window(since, now, by=objective.by, names=[objective.subject])
    window = found.get(objective.subject)
    if window is None:
        return None
    if objective.name == "start_within":
        return window.lag_p95()
    if objective.name == "success_share":
        return window.success_share()
    return window.dead_lettered * 60.0 / max(objective.window, 1e-9)


def evaluate(now: dt.datetime | None = None) -> Summary:
    """Evaluate every objective once; raise and resolve alerts (see the module doc)."""
    now = now or timezone.now()
    rollups.flush()  # this process's own counts first
    summary = Summary()
    for objective in slos.objectives(guard_settings.slos):
        value = measure(objective, now)
        summary.values[f"{objective.slo} {objective.name}"] = value
        with transaction.atomic():
            alert = (
                Alert.objects.select_for_update()
                .filter(slo=objective.slo, objective=objective.name, status__in=OPEN_ALERT_STATUSES)
                .first()
            )
            if objective.breached(value):
                alert = _breached(objective, alert, value, now, summary)
            elif alert is not None:
                _recovered(alert, value, now, summary)
    for alert in summary.raised:
        notify(alert, raised=True)
    for alert in summary.resolved:
        notify(alert, raised=False)
    return summary


def _breached(
    objective: slos.Objective,
    alert: Alert | None,
    value: float | None,
    now: dt.datetime,
    summary: Summary,
) -> Alert:
    if alert is None:
        alert = Alert.objects.create(
            slo=objective.slo,
            objective=objective.name,
            status=AlertStatus.PENDING,
            value=value,
            threshold=objective.threshold,
            breached_at=now,
            playbook=playbook(objective.name),
        )
    alert.value = value
    held = now - alert.breached_at >= dt.timedelta(minutes=objective.hold)
    if alert.status == AlertStatus.PENDING and held:
        alert.status = AlertStatus.FIRING
        alert.raised_at = now
        alert.message = describe(objective, value)
        summary.raised.append(alert)
    elif alert.status == AlertStatus.PENDING:
        summary.pending += 1
    alert.save(update_fields=["value", "status", "raised_at", "message"])
    return alert


def _recovered(alert: Alert, value: float | None, now: dt.datetime, summary: Summary) -> None:
    if alert.status == AlertStatus.PENDING:
        alert.delete()  # the breach did not hold: no incident
        return
    alert.status = AlertStatus.RESOLVED
    alert.resolved_at = now
    alert.value = value
    alert.save(update_fields=["status", "resolved_at", "value"])
    summary.resolved.append(alert)


def playbook(objective: str) -> str:
    """The playbook URL of an objective (a section of docs/observability.md)."""
    anchor = slos.OBJECTIVES.get(objective, ("", "playbook"))[1]
    return f"{guard_settings.playbook_url}#{anchor}"


def describe(objective: slos.Objective, value: float | None) -> str:
    """One line saying what is breached."""
    shown = "no data" if value is None else f"{value:.3g}"
    direction = slos.OBJECTIVES[objective.name][0]
    return (
        f"{objective.slo}: {objective.name} is {shown}, {direction} its objective "
        f"{objective.threshold:g} for {objective.hold:g}+ minutes"
    )


def text(alert: Alert, *, raised: bool) -> str:
    """The alert as a message for people (mail, chat)."""
    state = "ALERT" if raised else "resolved"
    value = "no data" if alert.value is None else f"{alert.value:.3g}"
    return (
        f"[celery_guard {state}] {alert.slo} {alert.objective}: {value} "
        f"(objective {alert.threshold:g}). Playbook: {alert.playbook}"
    )


def notify(alert: Alert, *, raised: bool) -> None:
    """Send the alert (or its resolution) to every configured sink; failures are logged."""
    fields = {
        "slo": alert.slo,
        "objective": alert.objective,
        "value": alert.value,
        "threshold": alert.threshold,
        "alert_id": alert.pk,
    }
    if raised:
        events.emit("alert_raised", **fields)
    else:
        events.emit("alert_resolved", **fields)
    for name in guard_settings.alert_sinks:
        sink = _SINKS.get(name)
        if sink is None:
            continue
        try:
            sink(alert, raised)
        except Exception:
            logger.warning("celery_guard: alert sink %s failed for %s", name, alert, exc_info=True)


def _log(alert: Alert, raised: bool) -> None:
    logger.log(logging.ERROR if raised else logging.INFO, text(alert, raised=raised))


def _mail(alert: Alert, raised: bool) -> None:
    if guard_settings.admins():
        body = text(alert, raised=raised)
        mail_admins(body.split(":", 1)[0] + f": {alert.slo} {alert.objective}", body)


def _sentry(alert: Alert, raised: bool) -> None:
    if not raised:
        return
    try:
        import sentry_sdk
    except ImportError:
        return
    if sentry_sdk.is_initialized():
        with sentry_sdk.new_scope() as scope:
            scope.set_tag("celery_guard.slo", alert.slo)
            scope.set_tag("celery_guard.objective", alert.objective)
            sentry_sdk.capture_message(text(alert, raised=True), level="error")


def webhook_payload(alert: Alert, *, raised: bool) -> dict[str, Any]:
    """The webhook's JSON: Slack's ``text``, and the alert's fields."""
    return {
        "text": text(alert, raised=raised),
        "alert": {
            "id": alert.pk,
            "slo": alert.slo,
            "objective": alert.objective,
            "status": alert.status,
            "value": alert.value,
            "threshold": alert.threshold,
            "breached_at": alert.breached_at.isoformat(),
            "playbook": alert.playbook,
        },
    }


def _webhook(alert: Alert, raised: bool) -> None:
    url = guard_settings.alert_webhook_url
    if not url:
        return
    body = json.dumps(webhook_payload(alert, raised=raised)).encode()
    request = urllib.request.Request(
        url, data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=WEBHOOK_TIMEOUT) as response:
        response.read()


_SINKS: Mapping[str, Callable[[Alert, bool], None]] = {
    "log": _log,
    "mail": _mail,
    "sentry": _sentry,
    "webhook": _webhook,
}
