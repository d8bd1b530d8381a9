"""A producer that dies between the claim and the publish, run as a separate process.

Usage: ``python -m tests.idem_producer_crash <employee_id> <event_version>``. It sets Django
up with the suite's settings (the environment names the test database, the ledger backend,
the Redis prefix and the publish grace), makes the app's ``send_task`` SIGKILL the process,
and enqueues ``idem_notify``: the key is claimed, then the process dies inside the publish,
before anything reaches the broker. The kill is in this script only, not in the library.
"""

import os
import signal
import sys


def _die(*args: object, **kwargs: object) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    employee_id, event_version = int(sys.argv[1]), sys.argv[2]
    os.environ["DJANGO_SETTINGS_MODULE"] = "tests.settings"
    import django

    django.setup()
    from tests.testapp.idem_tasks import idem_notify

    # Task.apply_async publishes through app.send_task: the publish callable of
    # publish_once runs it after the claim.
    idem_notify.app.send_task = _die  # type: ignore[method-assign]
    idem_notify.delay(employee_id, event_version)
    raise SystemExit("the publish should have killed this process")


if __name__ == "__main__":
    main()
