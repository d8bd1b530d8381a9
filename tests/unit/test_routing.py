"""Unit tests of the priority router and its installation into a Celery app."""

import pytest
from celery import Celery
from django.test import override_settings

from celery_guard import routing
from celery_guard.core import headers


def guarded_options(level):
    return {"headers": {headers.HEADER: {"v": 1, "priority": level}}}


@override_settings(CELERY_GUARD_PRIORITY_QUEUES={"high": "q-high", "low": "q-low"})
def test_route_task_maps_the_header_level_to_its_queue():
    assert routing.route_task("t", (), {}, guarded_options("high")) == {"queue": "q-high"}
    assert routing.route_task("t", (), {}, guarded_options("low")) == {"queue": "q-low"}


def test_route_task_leaves_unguarded_messages_to_the_next_router():
    assert routing.route_task("t", (), {}, {}) is None
    assert routing.route_task("t", (), {}, {"headers": {"other": 1}}) is None


def test_unknown_level_is_a_value_error():
    with pytest.raises(
        ValueError, match="priority level 'urgent' is not in CELERY_GUARD_PRIORITY_QUEUES"
    ):
        routing.route_task("t", (), {}, guarded_options("urgent"))


@pytest.mark.parametrize(
    "user_routes",
    [None, {"myapp.*": {"queue": "user-q"}}, ["some.Router"], "some.Router"],
)
def test_install_puts_the_router_first_and_keeps_user_routes(user_routes):
    app = Celery("routing-test", set_as_current=False)
    app.conf.task_routes = user_routes
    routing.install(app)
    routing.install(app)
    routes = app.conf.task_routes
    assert routes[0] == routing.ROUTER_PATH
    assert routes.count(routing.ROUTER_PATH) == 1
    expected_rest = (
        []
        if user_routes is None
        else (list(user_routes) if isinstance(user_routes, list) else [user_routes])
    )
    assert list(routes[1:]) == expected_rest


@override_settings(CELERY_GUARD_PRIORITY_QUEUES={"high": "q-high", "default": "q-default"})
def test_installed_router_routes_guarded_and_leaves_user_routes_for_the_rest():
    app = Celery("routing-test", set_as_current=False)
    app.conf.task_routes = {"myapp.*": {"queue": "user-q"}}
    router_before = app.amqp.router  # a router cached before installation must not go stale
    assert router_before.route({}, "myapp.plain")["queue"].name == "user-q"
    routing.install(app)
    router = app.amqp.router
    assert router.route(guarded_options("high"), "myapp.guarded")["queue"].name == "q-high"
    assert router.route({}, "myapp.plain")["queue"].name == "user-q"
    assert router.route({}, "other.plain")["queue"].name == app.conf.task_default_queue
    # An explicit queue given at call time still wins, as in plain Celery.
    explicit = {**guarded_options("high"), "queue": "explicit-q"}
    assert router.route(explicit, "myapp.guarded")["queue"].name == "explicit-q"
