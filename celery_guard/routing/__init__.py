"""Priority routing: levels mapped to queues by a Celery router that reads the guard header.

``celery_guard.routing.route_task`` is the router's public path, as users list it in
``task_routes``.
"""

from celery_guard.routing.router import ROUTER_PATH, install, is_installed, queue_for, route_task

__all__ = ["ROUTER_PATH", "install", "is_installed", "queue_for", "route_task"]
