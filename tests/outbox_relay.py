"""A delivery poller that publishes slowly, run as a separate process to be SIGKILLed.

Usage: ``python -m tests.outbox_relay``, with the suite's settings. It polls like
``manage.py celery_guard relay`` but sleeps 20 ms before each publish, so a test can kill it
in the middle of a batch. The sleep is in this script only, not in the library.
"""

import os
import time


def main() -> None:
    os.environ["DJANGO_SETTINGS_MODULE"] = "tests.settings"
    import django

    django.setup()
    from celery import current_app

    from celery_guard.delivery import services
    from celery_guard.delivery.poller import Poller

    publish = services._publish

    def slow(*args: object, **kwargs: object) -> None:
        time.sleep(0.02)
        publish(*args, **kwargs)  # type: ignore[arg-type]

    services._publish = slow  # type: ignore[assignment]
    Poller(current_app, outbox=True).run()


if __name__ == "__main__":
    main()
