"""Benchmark harness: celery_guard against plain Celery, side by side, in one run (`make bench`)."""
