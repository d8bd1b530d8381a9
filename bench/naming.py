"""Names of the run's queues and keys, derived from the run id the runner exports."""

from __future__ import annotations

import os

RUN_ID_ENV = "CG_BENCH_RUN_ID"
#: Path of the SQLite file of the "database ledger on SQLite" case (PostgreSQL runs only).
LEDGER_SQLITE_ENV = "CG_BENCH_LEDGER_SQLITE"
#: Its Django database alias.
LEDGER_SQLITE_ALIAS = "ledger_sqlite"


def prefix() -> str:
    """Return the prefix of every queue name and Redis key of this run (``cgb-<run id>``)."""
    return f"cgb-{os.environ.get(RUN_ID_ENV, 'local')}"
