"""Unit tests: pure code, no database, no broker, no process."""
