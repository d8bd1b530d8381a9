"""The limits step: stamp the tenant at enqueue; admit, defer or pause a run in the worker.

Admission happens right before the body, inside the failure step: a delivery that starts
past its ``deadline`` is dead-lettered by the failure step before it is admitted (so a job
paused or throttled past its deadline never runs), and a deferral is a ``Retry`` the failure
step lets through without counting an attempt. It sits outside the idempotency step, so a
deferred delivery never takes its key's lease.

An over-limit or paused delivery is not held: it is republished through the delivery
schedule (``publish_at``), its guard header unchanged but for the ``deferred`` count (and
its reservations), and its message acked; the worker process is free at once. A store that
reserves (Redis) gives a refused delivery its own future start, spread by the rate (or by
the measured gap between releases of a full semaphore) behind the deliveries already
waiting, so it is republished about once instead of coming back to be refused again.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

from celery.exceptions import Reject
from django.core.exceptions import ImproperlyConfigured

from celery_guard import durations
from celery_guard.conf import duration, guard_settings, raw
from celery_guard.core import headers, http
from celery_guard.core.pipeline import Delivery, Publish, Step
from celery_guard.exceptions import Deferral, ThrottledError
from celery_guard.limits import rules, services, store
from celery_guard.observability import events

logger = logging.getLogger(__name__)

#: The guard header field counting a job's deferrals (not attempts).
DEFERRED = "deferred"
#: Longest delay of one deferral (seconds): a limit is checked again at least this often.
MAX_DEFER = 30.0
#: Longest back-off (seconds) a 429's ``Retry-After`` puts on a named limit.
MAX_BACK_OFF = 3600.0

#: The guard header field listing the scopes a delivery holds a reservation of: on its
#: return it is admitted ahead of the deliveries that hold none.
RESERVED = "reserved"
#: Longest delay of a deferral to a reservation (seconds), unless the task's ``deadline``
#: comes first: a reservation further out is reached in several deferrals.
MAX_RESERVE = 300.0
#: The guard header field of when (epoch seconds) a reservation longer than one deferral is
#: due: a delivery back before it is deferred again without asking the store.
UNTIL = "until"
#: Most seconds a delivery back before its reservation may be early and still be admitted.
EARLY = 0.05

#: The guard header field of the priority level (stamped by the routing step; the router
#: sends a message to its level's queue).
PRIORITY = "priority"

#: Seconds a process waits before requeueing a delivery whose deferral failed to publish.
REQUEUE_PAUSE = 1.0

_outage_logged = False


def _jittered(delay: float) -> float:
    # Deferred deliveries must not all come back at the same instant.
    return round(min(delay, MAX_DEFER) * random.uniform(1.0, 1.5) + random.uniform(0, 0.1), 3)


def defer(
    task: Any,
    guard: Mapping[str, Any],
    limit: str,
    delay: float,
    event: str,
    fields: Mapping[str, Any] | None = None,
    queue: str | None = None,
) -> NoReturn:
    """Republish the running delivery ``delay`` seconds later without counting an attempt.

    ``fields`` replace guard header fields of the republished delivery (``None``: drop one);
    ``queue`` sends it to another queue than the one it came from.

    Raises:
        celery_guard.exceptions.Deferral: Always once republished (a ``Retry``: Celery acks
            this delivery).
        celery.exceptions.Reject: With ``requeue=True`` when it could not be republished.
    """
    request = task.request
    count = guard.get(DEFERRED, 0)
    count = count + 1 if isinstance(count, int) and not isinstance(count, bool) else 1
    again_guard = {**guard, DEFERRED: count, **(fields or {})}
    again_guard = {name: value for name, value in again_guard.items() if value is not None}
    message_headers = {**(request.headers or {}), headers.HEADER: again_guard}
    try:
        again = task.signature_from_request(
            request,
            queue=queue,
            countdown=delay,
            retries=request.retries,
            headers=message_headers,
        )
        again.apply_async()
    except Exception as exc:
        logger.error(
            "celery_guard: could not defer %s[%s] (%s); requeueing it",
            task.name,
            request.id,
            limit,
            exc_info=True,
        )
        events.emit("requeued", why=f"the deferral ({limit}) could not be published")
        # The broker (or the database schedule) is down: pause before the redelivery, so a
        # broker that redelivers at once does not spin this process.
        time.sleep(REQUEUE_PAUSE)
        raise Reject(exc, requeue=True) from exc
    if event == "deferred":
        events.emit("deferred", limit=limit, delay=delay)
    else:
        events.emit("throttled", limit=limit, delay=delay)
    logger.info(
        "celery_guard: %s[%s] %s by %s: again in %.2fs (deferral %s)",
        task.name,
        request.id,
        event,
        limit,
        delay,
        count,
    )
    raise Deferral(f"{event} by {limit}", when=delay, sig=again)


def _outage(task: Any, guard: Mapping[str, Any], exc: Exception) -> None:
    """The store is unreachable: run anyway (the default) or defer, and say so."""
    global _outage_logged
    if guard_settings.limits_on_outage == "defer":
        logger.warning("celery_guard: limits store unreachable (%s); deferring %s", exc, task.name)
        defer(task, guard, "unavailable", _jittered(guard_settings.limits_defer_delay), "throttled")
    if not _outage_logged:
        logger.warning(
            "celery_guard: limits store unreachable (%s); running %s and others WITHOUT their "
            "limits until it is back (CELERY_GUARD_LIMITS_ON_OUTAGE='run')",
            exc,
            task.name,
        )
        _outage_logged = True


def _back_off(limits: store.LimitsStore, found: list[rules.Rule], exc: Exception) -> None:
    """A 429 with ``Retry-After`` slows the named limits of the run for the whole cluster."""
    if not (isinstance(exc, ThrottledError) or http.http_status(exc) == 429):
        return
    shared = [rule for rule in found if rule.scope.startswith("limit:")]
    seconds = http.retry_after_of(exc, time.time())
    if not shared or not seconds:
        return
    seconds = min(seconds, MAX_BACK_OFF)
    try:
        limits.back_off(shared, seconds)
    except store.Unavailable:
        return
    logger.warning(
        "celery_guard: the gateway behind %s answered throttled (Retry-After %.1fs): no run "
        "is admitted under it until then",
        ", ".join(rule.scope for rule in shared),
        seconds,
    )


def _longest_wait(task: Any, guard: Mapping[str, Any]) -> float:
    """How long one deferral to a reservation may wait: ``MAX_RESERVE``, or until the deadline.

    A delivery back past its deadline is dead-lettered by the failure step then, not when a
    far reservation falls due.
    """
    own = getattr(task, "guard_options", None) or {}
    try:
        deadline = durations.seconds(own["deadline"]) if "deadline" in own else None
        if deadline is None and raw("DEADLINE") is not None:
            deadline = duration("DEADLINE")
    except (TypeError, ValueError, ImproperlyConfigured):
        deadline = None
    first = guard.get("first_enqueued_at")
    if deadline is None or not isinstance(first, (int, float)):
        return MAX_RESERVE
    return min(MAX_RESERVE, max(first + deadline - time.time(), 0.0) + 0.1)


def _refused(task: Any, guard: Mapping[str, Any], admission: store.Admission) -> NoReturn:
    """Defer a refused delivery: to its reservation, or by the time the store gave."""
    assert admission.rule is not None
    limit = f"{admission.rule.scope}:{admission.kind}"
    if admission.reserved:
        # Reservations are already spread by the rate (or the gap between releases): a
        # little jitter is enough.
        wait = max(admission.wait, 0.0) + random.uniform(0, 0.02)
        held = guard.get(RESERVED)
        scopes = [s for s in held if isinstance(s, str)] if isinstance(held, list) else []
        if admission.rule.scope not in scopes:
            scopes.append(admission.rule.scope)
        longest = _longest_wait(task, guard)
        until = round(time.time() + wait, 3) if wait > longest else None
        fields = {RESERVED: scopes, UNTIL: until}
        defer(task, guard, limit, round(min(wait, longest), 3), "throttled", fields)
    if admission.kind in ("rate", "backoff"):
        # The store knows when its window frees a start or its back-off ends.
        base = max(admission.wait, 0.05)
    else:
        base = guard_settings.limits_defer_delay
    defer(task, guard, limit, _jittered(base), "throttled", {UNTIL: None})


def _move(task: Any, guard: Mapping[str, Any], level: str) -> None:
    """Send a delivery queued under another level than its policy's to that level's queue.

    Deliveries already queued when an operator overrode the priority move once, without
    running and without counting an attempt; a delivery already on its level runs on.
    """
    if guard.get(PRIORITY) == level:
        return
    queue = guard_settings.priority_queues.get(level)
    if queue is None:  # the level left the settings since the policy was read
        return
    defer(task, guard, f"policy priority {level}", 0.0, "deferred", {PRIORITY: level}, queue)


class LimitsStep(Step):
    """Cluster-wide concurrency and rates, tenants, pauses (see ``docs/limits.md``)."""

    name = "limits"
    options = rules.OPTIONS

    def check(self, task_options: Mapping[str, Any], where: str) -> None:
        """A per-tenant limit needs a ``tenant`` template."""
        rules.check_together(task_options, where)

    def prepare(self, publish: Publish) -> None:
        """Stamp the call's tenant (``ValueError`` when the template cannot be rendered).

        A task policy's priority override replaces the level the routing step stamped (the
        task's, or the call's ``guard={"priority": ...}``): it is an operator's decision.
        """
        policy = services.for_publish(publish.task.name)
        if policy is not None and policy.priority is not None:
            publish.fields[PRIORITY] = policy.priority
        if rules.TENANT_FIELD in publish.inherited and rules.TENANT.name not in publish.per_call:
            return  # a retry or deferral keeps its tenant
        tenant = rules.tenant_of(publish.task, publish.args, publish.kwargs, publish.per_call)
        publish.fields[rules.TENANT_FIELD] = tenant

    def around(self, delivery: Delivery, call: Callable[[], Any]) -> Any:
        """Admit the body under the task's limits, or defer the delivery; release after it."""
        global _outage_logged
        request = delivery.request
        if request.called_directly or request.is_eager or request.id is None:
            return call()
        task = delivery.task
        policy = services.current(task.name)
        guard = delivery.guard
        if policy is not None and policy.priority is not None:
            _move(task, guard, policy.priority)
        if policy is not None and policy.paused:
            defer(task, guard, "paused", _jittered(guard_settings.limits_defer_delay), "deferred")
        tenant = guard.get(rules.TENANT_FIELD)
        found = rules.rules_for(
            task,
            tenant if isinstance(tenant, str) else None,
            concurrency=policy.concurrency if policy else None,
            rate=policy.rate if policy else None,
        )
        if not found:
            return call()
        until = guard.get(UNTIL)
        if isinstance(until, (int, float)) and until - time.time() > EARLY:
            # Back before its reservation (a wait longer than MAX_DEFER): the store has
            # nothing new to say.
            wait = until - time.time()
            defer(task, guard, "reservation", min(wait, _longest_wait(task, guard)), "throttled")
        try:
            limits = store.get_store()
            lease = guard_settings.limits_lease
            store.settle()  # this process's last release first: its slot may be the one free
            if limits.reserves:
                held = guard.get(RESERVED)
                held = [s for s in held if isinstance(s, str)] if isinstance(held, list) else []
                admission = limits.admit(found, lease, reserve=True, held=held)
            else:
                admission = limits.admit(found, lease)
        except store.Unavailable as exc:
            _outage(task, guard, exc)
            return call()
        _outage_logged = False
        if not admission.admitted:
            _refused(task, guard, admission)
        store.hold(limits, found, admission.holder, lease)
        try:
            return call()
        except Exception as exc:
            _back_off(limits, found, exc)
            raise
        finally:
            store.release_later(limits, found, admission.holder)
