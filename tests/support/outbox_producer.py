"""A producer of outbox rows, run as a separate process by the delivery tests.

Usage: ``python -m tests.support.outbox_producer <mode> <label-prefix> <count>``, with the suite's
settings (the environment names the test database and the broker). ``mode``:

* ``kill``: commits ``count`` rows, then SIGKILLs itself in the first on-commit callback,
  before the fast path publishes anything;
* ``commit``: commits ``count`` rows one transaction each (the fast path publishes them, or
  leaves them to the poller when the broker is down).

The kill is in this script only, not in the library.
"""

import os
import signal
import sys


def main() -> None:
    mode, prefix, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    os.environ["DJANGO_SETTINGS_MODULE"] = "tests.settings"
    import django

    django.setup()
    from django.db import transaction

    from tests.testapp.outbox_tasks import outbox_job

    if mode == "kill":
        with transaction.atomic():
            transaction.on_commit(lambda: os.kill(os.getpid(), signal.SIGKILL))
            for i in range(count):
                outbox_job.delay_on_commit(f"{prefix}-{i}")
        raise SystemExit("the on-commit kill should have killed this process")
    for i in range(count):
        with transaction.atomic():
            outbox_job.delay_on_commit(f"{prefix}-{i}")


if __name__ == "__main__":
    main()
