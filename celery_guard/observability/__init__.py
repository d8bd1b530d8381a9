"""Observability: what the guard reports about the runs it guards (logs; metrics to come)."""
