"""What the figures were measured on: machine, versions, services."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from typing import Any

PACKAGES = ("celery", "kombu", "django", "redis", "celery-guard", "psycopg")


def cpu_model() -> str:
    """Return the CPU model name (``/proc/cpuinfo`` on Linux, else the platform's)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> str:
    """Return the 1/5/15-minute load averages, or ``?`` where there are none."""
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def package_versions() -> dict[str, str]:
    """Return the installed versions of the packages the figures depend on."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def collect(redis_client: Any, database: Any) -> dict[str, Any]:
    """Return the fingerprint of this machine and of the run's services."""
    if database.engine == "postgresql":
        import psycopg

        with psycopg.connect(database.url) as conn:
            row = conn.execute("SHOW server_version").fetchone()
        db_version = f"PostgreSQL {row[0] if row else '?'}"
    else:
        import sqlite3

        db_version = f"SQLite {sqlite3.sqlite_version}"
    return {
        "cores": os.cpu_count(),
        "cpu_model": cpu_model(),
        "platform": platform.platform(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "executable": sys.executable,
        "packages": package_versions(),
        "redis_version": f"Redis {redis_client.info('server').get('redis_version', '?')}",
        "database_version": db_version,
        "load_start": load_average(),
    }
