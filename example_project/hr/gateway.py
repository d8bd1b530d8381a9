"""A simulated mail gateway (a local HTTP server) and the client the HR tasks call it with.

The server behaves like a transactional mail API under load: it bears ``capacity`` requests
per second (beyond that: 429 with ``Retry-After``), and at random, at the given rates, it
answers 429, 503, or times out (half of the timeouts after it accepted the mail, the case
that sends twice without an idempotency key). An address that is not an address gets 400.
A request carrying an ``Idempotency-Key`` that was already accepted is answered with the
first message id and sends nothing, as Stripe-style APIs do. It counts what it delivered
per template and recipient, so the demo can show sends per employee.
"""

from __future__ import annotations

import json
import random
import re
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from celery_guard import PermanentError, ThrottledError, TransientError

#: How long the client waits for an answer; a simulated timeout lasts longer.
CLIENT_TIMEOUT = 1.0
ADDRESS = re.compile(r"^[^@\s]+@[^@\s]+\.[a-z]{2,}$")


@dataclass
class Faults:
    """Rates (0..1) of the gateway's random answers, per request.

    A random 429 carries ``Retry-After: 1``, which stops the whole cluster's sends under the
    named limit for that second (docs/limits.md): at 3 % of 150 sends/s that was a stop
    every 0.2 s of sending, and the run spent most of its time backed off. 0.5 % still
    throttles the run every few seconds.
    """

    throttle: float = 0.005
    server_error: float = 0.02
    timeout: float = 0.01


@dataclass
class GatewayStats:
    """What the gateway saw: delivered mails per (template, recipient), answers by kind."""

    delivered: Counter[tuple[str, int]] = field(default_factory=Counter)
    answers: Counter[str] = field(default_factory=Counter)

    def sends(self, template: str) -> Counter[int]:
        """Mails delivered per recipient id for one template."""
        return Counter({rid: n for (tpl, rid), n in self.delivered.items() if tpl == template})


class MailGateway:
    """The simulated gateway on a free port of 127.0.0.1, served by a thread."""

    def __init__(self, *, capacity: float = 200.0, faults: Faults | None = None, seed: int = 7):
        self.capacity = capacity
        self.faults = faults or Faults()
        self.stats = GatewayStats()
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._tokens = capacity
        self._refilled = time.monotonic()
        self._accepted: dict[str, str] = {}
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.gateway = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        """Base URL of the gateway."""
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> MailGateway:
        """Serve in a background thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()

    def _take_token(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self.capacity, self._tokens + (now - self._refilled) * self.capacity)
        self._refilled = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    def answer(self, message: dict[str, Any], key: str) -> tuple[int, dict[str, str], float]:
        """Decide the answer to one send: (status, body, seconds to stall before answering)."""
        with self._lock:
            if not self._take_token():
                self.stats.answers["429 over capacity"] += 1
                return 429, {"error": "rate limited"}, 0.0
            if key and key in self._accepted:
                self.stats.answers["200 replayed (idempotency key)"] += 1
                return 200, {"id": self._accepted[key], "replayed": "true"}, 0.0
            roll = self._random.random()
            faults = self.faults
            if roll < faults.throttle:
                self.stats.answers["429 random"] += 1
                return 429, {"error": "slow down"}, 0.0
            roll -= faults.throttle
            if roll < faults.server_error:
                self.stats.answers["503"] += 1
                return 503, {"error": "unavailable"}, 0.0
            roll -= faults.server_error
            timeout = roll < faults.timeout
            if not ADDRESS.match(str(message.get("to", ""))):
                self.stats.answers["400 invalid address"] += 1
                return 400, {"error": "invalid recipient address"}, 0.0
            if timeout and self._random.random() < 0.5:
                self.stats.answers["timeout (not accepted)"] += 1
                return 504, {"error": "timeout"}, CLIENT_TIMEOUT + 0.5
            message_id = uuid.uuid4().hex
            if key:
                self._accepted[key] = message_id
            self.stats.delivered[(str(message["template"]), int(message["recipient_id"]))] += 1
            if timeout:
                self.stats.answers["timeout (accepted)"] += 1
                return 200, {"id": message_id}, CLIENT_TIMEOUT + 0.5
            self.stats.answers["200 sent"] += 1
            return 200, {"id": message_id}, 0.0


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        gateway: MailGateway = self.server.gateway  # type: ignore[attr-defined]
        length = int(self.headers.get("Content-Length") or 0)
        message = json.loads(self.rfile.read(length) or b"{}")
        status, body, stall = gateway.answer(message, self.headers.get("Idempotency-Key", ""))
        if stall:
            time.sleep(stall)
        payload = json.dumps(body).encode()
        try:
            self.send_response(status)
            if status == 429:
                self.send_header("Retry-After", "1")
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except OSError:  # the client gave up (a simulated timeout)
            pass

    def log_message(self, format: str, *args: Any) -> None:
        pass


def send(url: str, *, template: str, recipient_id: int, to: str, key: str) -> str:
    """Send one mail through the gateway at ``url``; return its message id.

    The guard's exceptions say what to do with a failure: ``ThrottledError`` (429, retried
    after ``Retry-After`` without consuming an attempt), ``TransientError`` (5xx, network;
    retried with backoff), ``PermanentError`` (400: dead-lettered at once). A timeout raises
    ``TimeoutError``, which the guard classifies as transient by itself.
    """
    body = json.dumps({"template": template, "recipient_id": recipient_id, "to": to}).encode()
    request = urllib.request.Request(
        f"{url}/send",
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", "Idempotency-Key": key},
    )
    try:
        with urllib.request.urlopen(request, timeout=CLIENT_TIMEOUT) as response:
            return str(json.loads(response.read())["id"])
    except urllib.error.HTTPError as exc:
        if exc.code == 429:
            raise ThrottledError(
                f"gateway 429 for {to}", retry_after=float(exc.headers.get("Retry-After") or 1)
            ) from None
        if exc.code >= 500:
            raise TransientError(f"gateway {exc.code} for {to}") from None
        raise PermanentError(f"gateway {exc.code} for {to}: {exc.read().decode()}") from None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, TimeoutError):
            raise TimeoutError(f"gateway timeout for {to}") from None
        raise TransientError(f"gateway unreachable: {exc.reason}") from None
