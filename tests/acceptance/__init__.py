"""Acceptance tests: real ``celery worker`` / ``beat`` processes, a browser."""
