"""Durable, timely delivery: the transactional outbox and the schedule of delayed messages."""
