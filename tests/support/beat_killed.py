"""A guarded scheduler that SIGKILLs its own process between a slot's claim and its publish.

Run by ``tests/acceptance/test_beat.py`` as ``celery beat -S tests.support.beat_killed:
KilledAfterClaim``: the claim (fire row and outbox row) has committed, nothing is published.
The kill is in this test module only, not in the library.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from celery_guard.beat import GuardedScheduler


class KilledAfterClaim(GuardedScheduler):  # type: ignore[misc]
    """Dies where a beat crash would lose the slot without the outbox."""

    def _publish(self, *args: Any, **kwargs: Any) -> None:
        os.kill(os.getpid(), signal.SIGKILL)
