"""A Sentry transport for the tests: every error event and cron check-in is appended to a file
as a JSON line."""

from __future__ import annotations

import json
import os
from typing import Any

import sentry_sdk
from sentry_sdk.transport import Transport


class FileTransport(Transport):
    """Writes each event of an envelope to ``path`` (one JSON object per line)."""

    def __init__(self, options: dict[str, Any] | None = None, *, path: str = "") -> None:
        super().__init__(options)
        self.path = path

    def capture_envelope(self, envelope: Any) -> None:
        for item in envelope.items:
            if item.type == "check_in" and item.payload.json is not None:
                self._write({"kind": "check_in", **item.payload.json, "pid": os.getpid()})
        event = envelope.get_event()
        if event is None:
            return
        line = json.dumps(
            {
                "event_id": event.get("event_id"),
                "tags": event.get("tags") or {},
                "level": event.get("level"),
                "breadcrumbs": (event.get("breadcrumbs") or {}).get("values", []),
                "exception": [
                    v.get("type") for v in (event.get("exception") or {}).get("values", [])
                ],
                "pid": os.getpid(),
            },
            default=str,
        )
        self._write(json.loads(line))

    def _write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as out:
            out.write(json.dumps(record, default=str) + "\n")


def init_sentry(path: str) -> None:
    """``sentry_sdk.init`` as a project does, with its default integrations, into ``path``."""
    sentry_sdk.init(
        dsn="https://public@sentry.example.invalid/1",
        transport=FileTransport(path=path),
        default_integrations=True,
    )


def _records(path: str) -> list[dict[str, Any]]:
    try:
        with open(path, encoding="utf-8") as lines:
            return [json.loads(line) for line in lines if line.strip()]
    except FileNotFoundError:
        return []


def events(path: str) -> list[dict[str, Any]]:
    """The error events written to ``path`` so far."""
    return [r for r in _records(path) if r.get("kind") != "check_in"]


def checkins(path: str) -> list[dict[str, Any]]:
    """The cron check-ins written to ``path`` so far, in order."""
    return [r for r in _records(path) if r.get("kind") == "check_in"]
