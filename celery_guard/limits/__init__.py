"""Limits: cluster-wide concurrency and rates, per-tenant limits, run-time task policies."""
