"""The Prometheus endpoint: ``celery-guard/metrics``, for staff users or the bearer token."""

from __future__ import annotations

import hmac

from django.http import HttpRequest, HttpResponse

from celery_guard.conf import guard_settings
from celery_guard.observability import metrics


def _allowed(request: HttpRequest) -> bool:
    token = guard_settings.metrics_token
    given = request.headers.get("Authorization", "")
    if token and given.startswith("Bearer "):
        return hmac.compare_digest(given[len("Bearer ") :].strip(), token)
    user = getattr(request, "user", None)
    return bool(user is not None and user.is_active and user.is_staff)


def metrics_view(request: HttpRequest) -> HttpResponse:
    """The text exposition; 403 unless staff or the token; 404 without prometheus-client."""
    if not _allowed(request):
        return HttpResponse("forbidden\n", status=403, content_type="text/plain")
    if not metrics.available():
        return HttpResponse(
            "prometheus-client is not installed: pip install 'celery-guard[prometheus]'\n",
            status=404,
            content_type="text/plain",
        )
    body, content_type = metrics.exposition()
    return HttpResponse(body, content_type=content_type)
