"""The dead-letter queue: final failures as rows, inspected, replayed and discarded."""
