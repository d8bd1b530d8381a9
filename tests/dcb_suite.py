"""Run django-celery-beat's own scheduler tests with ``GuardedScheduler`` swapped in.

    python -m tests.dcb_suite [--workdir DIR] [--celery SPEC] [--baseline] [pytest args...]

Makes a virtualenv in the work folder with this checkout (editable), the django-celery-beat
version installed here, ``SPEC`` (e.g. ``"celery>=5.5,<5.6"``) and django-celery-beat's test
dependencies (``pytest<9``, ``pytest-django``, ``ephem``); downloads django-celery-beat's
source distribution (its tests are not in the wheel) with ``pip download``; and runs its unit
tests (``t/unit``; the scheduler's are in ``test_schedulers.py``) with
``django_celery_beat.schedulers.DatabaseScheduler`` replaced by ``GuardedScheduler`` before
the test module is imported (so its ``TrackingScheduler`` subclass is guarded too), on
django-celery-beat's own test settings plus ``celery_guard``. ``--baseline`` runs the same
tests unswapped. Needs the package registries (or pip's cache). Not part of ``make test``;
the result and the intended differences are recorded in ``docs/beat.md``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SETTINGS = """\
from t.proj.settings import *  # noqa: F403
from t.proj.settings import INSTALLED_APPS

INSTALLED_APPS = [*INSTALLED_APPS, "celery_guard"]
USE_TZ = True
"""

PLUGIN = """\
import os


def pytest_configure(config):
    if os.environ.get("CG_DCB_BASELINE"):
        return
    import django

    django.setup()
    from django_celery_beat import schedulers

    from celery_guard.beat import GuardedScheduler

    schedulers.DatabaseScheduler = GuardedScheduler
"""


def virtualenv(workdir: Path, version: str, celery: str) -> Path:
    """Create the suite's virtualenv (once per Celery spec); return its python."""
    venv = workdir / ("venv-" + "".join(c if c.isalnum() else "_" for c in celery))
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [
                str(python),
                "-m",
                "pip",
                "install",
                "--quiet",
                "-e",
                str(ROOT),
                f"django-celery-beat=={version}",
                celery,
                "pytest>=8,<9",
                "pytest-django>=4.5",
                "pytest-timeout",
                "ephem",
            ],
            check=True,
        )
    return python


def source_tree(workdir: Path, python: Path, version: str) -> Path:
    """Download and unpack the sdist of django-celery-beat ``version``; return its root."""
    root = workdir / f"django_celery_beat-{version}"
    if root.exists():
        return root
    subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--no-binary",
            ":all:",
            "--dest",
            str(workdir),
            f"django-celery-beat=={version}",
        ],
        check=True,
    )
    with tarfile.open(workdir / f"django_celery_beat-{version}.tar.gz") as archive:
        # The "data" filter (no links out, no device files) where this Python has it.
        if hasattr(tarfile, "data_filter"):
            archive.extractall(workdir, filter="data")
        else:  # pragma: no cover - Python < 3.10.12
            archive.extractall(workdir)
    return root


def main(argv: list[str] | None = None) -> int:
    """Run the swapped (or ``--baseline``) suite; return pytest's exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "cg-dcb")
    parser.add_argument("--celery", default="celery>=5.5", help="Celery requirement to test on")
    parser.add_argument("--baseline", action="store_true", help="DatabaseScheduler, unswapped")
    args, pytest_args = parser.parse_known_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    version = metadata.version("django-celery-beat")
    python = virtualenv(args.workdir, version, args.celery)
    root = source_tree(args.workdir, python, version)
    (root / "cg_guarded_settings.py").write_text(SETTINGS)
    (root / "cg_guarded_swap.py").write_text(PLUGIN)
    env = {
        "DJANGO_SETTINGS_MODULE": "cg_guarded_settings",
        "PYTHONPATH": f"{root}:{ROOT}",
        **({"CG_DCB_BASELINE": "1"} if args.baseline else {}),
    }
    command = [
        str(python),
        "-m",
        "pytest",
        "-p",
        "cg_guarded_swap",
        "-p",
        "no:cacheprovider",
        "-q",
        "t/unit",
        *pytest_args,
    ]
    return subprocess.run(command, cwd=root, env={**os.environ, **env}, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
