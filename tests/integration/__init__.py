"""Integration tests: the database, the admin, commands, ledgers and the broker; no worker."""
