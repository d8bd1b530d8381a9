"""The failure pipeline: classify, retry with backoff, cap lost deliveries, dead-letter."""
