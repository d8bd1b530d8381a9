"""Shared harness of the test levels: processes, fixtures, helpers of ledgers and dead letters."""
