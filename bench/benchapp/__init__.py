"""Django app of the benchmark: task bodies, the case tasks, the worker-ready handshake."""
