"""A producer that dies between its claim and the confirmation, run as a separate process.

Usage: ``python -m tests.idem_producer_crash <employee_id> <event_version> <where>``. It sets
Django up with the suite's settings (the environment names the test database, the ledger
backend, the Redis prefix and the publish grace) and enqueues ``idem_notify`` after making
the process SIGKILL itself, where ``where`` is:

* ``publish``: inside the publish (the app's ``send_task``): the key is claimed and nothing
  reaches the broker;
* ``confirm``: in the ledger's ``confirm``: the message is published, the claim is never
  confirmed.

The kill is in this script only, not in the library.
"""

import os
import signal
import sys


def _die(*args: object, **kwargs: object) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    employee_id, event_version, where = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    os.environ["DJANGO_SETTINGS_MODULE"] = "tests.settings"
    import django

    django.setup()
    from celery_guard.idempotency import ledger
    from tests.testapp.idem_tasks import idem_notify

    if where == "publish":
        # Task.apply_async publishes through app.send_task: the publish callable of
        # publish_once runs it after the claim.
        idem_notify.app.send_task = _die  # type: ignore[method-assign]
    elif where == "confirm":
        ledger.DatabaseLedger.confirm = _die  # type: ignore[method-assign,assignment]
        ledger.RedisLedger.confirm = _die  # type: ignore[method-assign,assignment]
    else:
        raise SystemExit(f"unknown crash point {where!r}")
    idem_notify.delay(employee_id, event_version)
    raise SystemExit(f"the {where} should have killed this process")


if __name__ == "__main__":
    main()
