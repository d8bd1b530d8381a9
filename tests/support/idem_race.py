"""One producer of the idempotency race test, run as a separate process.

Usage: ``python -m tests.support.idem_race <index> <keys> <enqueues> <go-file> <out-file>``. It sets
Django up with the suite's settings (the environment names the test database, the backend and
the Redis prefix), waits for the go file so all producers start together, enqueues its share
and writes ``[[n, task_id], ...]`` as JSON.
"""

import json
import os
import random
import sys
import time
from pathlib import Path


def share(index: int, keys: int, enqueues: int) -> list[int]:
    """Key numbers producer ``index`` enqueues: half of them repeats of its own earlier keys.

    Producers ``i`` and ``i + 4`` draw from the same quarter of the key space, so every key
    is enqueued by two processes, twice each.
    """
    quarter = keys // 4
    mine = [(index % 4) * quarter + i for i in range(enqueues // 2)]
    order = mine * 2
    random.Random(index).shuffle(order)
    return order


def main() -> None:
    index, keys, enqueues = (int(x) for x in sys.argv[1:4])
    go, out = Path(sys.argv[4]), Path(sys.argv[5])
    os.environ["DJANGO_SETTINGS_MODULE"] = "tests.settings"
    import django

    django.setup()
    from tests.testapp.idem_tasks import idem_race

    while not go.exists():
        time.sleep(0.01)
    results = [[n, idem_race.delay(n).id] for n in share(index, keys, enqueues)]
    out.write_text(json.dumps(results))


if __name__ == "__main__":
    main()
