"""``RequestIdMiddleware``: one request id from the browser click to the worker's log lines."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery_guard.observability import context

#: The request and response header of the request id.
HEADER = "X-Request-ID"
_META_KEY = "HTTP_X_REQUEST_ID"


class RequestIdMiddleware:
    """Take the request id from ``X-Request-ID`` (or make one) and bind it for the request.

    Guarded tasks enqueued while the request runs carry the id and the user's id in their
    guard header (field ``request``); the worker's log records of those tasks, and of tasks
    they enqueue, carry them too. The id is echoed in the response's ``X-Request-ID``.
    """

    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        self.get_response = get_response

    def __call__(self, request: Any) -> Any:
        """Run the view with the request's origin bound."""
        request_id = context.clean_request_id(request.META.get(_META_KEY))
        request_id = request_id or context.new_request_id()
        request.request_id = request_id
        origin = context.Origin(request_id, lambda: _user_id(request))
        with context.bind_origin(origin):
            response = self.get_response(request)
        response[HEADER] = request_id
        return response


def _user_id(request: Any) -> str | None:
    # Read when a task is enqueued: by then the authentication middleware has run.
    user = getattr(request, "user", None)
    if user is None or not getattr(user, "is_authenticated", False):
        return None
    return str(user.pk)
