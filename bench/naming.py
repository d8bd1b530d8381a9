"""Names of the run's queues and keys, derived from the run id the runner exports."""

from __future__ import annotations

import os

RUN_ID_ENV = "CG_BENCH_RUN_ID"


def prefix() -> str:
    """Return the prefix of every queue name and Redis key of this run (``cgb-<run id>``)."""
    return f"cgb-{os.environ.get(RUN_ID_ENV, 'local')}"
