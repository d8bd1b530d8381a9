"""A delivery poller that publishes slowly, run as a separate process to be SIGKILLed.

Usage: ``python -m tests.support.outbox_relay``, with the suite's settings. It runs
``manage.py celery_guard relay`` with a sleep of 20 ms before each publish, so a test can kill it
in the middle of a batch. The sleep is in this script only, not in the library.
"""

import os
import time


def main() -> None:
    os.environ["DJANGO_SETTINGS_MODULE"] = "tests.settings"
    import django

    django.setup()
    from django.core.management import call_command

    from celery_guard.delivery import services

    publish = services._publish

    def slow(*args: object, **kwargs: object) -> None:
        time.sleep(0.02)
        publish(*args, **kwargs)  # type: ignore[arg-type]

    services._publish = slow  # type: ignore[assignment]
    call_command("celery_guard", "relay")


if __name__ == "__main__":
    main()
