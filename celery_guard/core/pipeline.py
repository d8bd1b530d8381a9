"""The guard pipeline: the ordered steps, one per feature, that a guarded task runs.

Each feature contributes one :class:`Step` that declares the options it owns and overrides
the hooks it needs:

* :meth:`Step.check` (decoration time): check the task's validated options together.
* :meth:`Step.prepare` (publish side, before anything reaches the broker): validate the call
  and add the feature's fields to the guard header; raising refuses the publish.
* :meth:`Step.publish` (publish side): wrap the publish itself (publish once per key...).
* :meth:`Step.around` (worker side): wrap the task body of one :class:`Delivery`.

:class:`Pipeline` composes the steps in order, the first one outermost (as procrastinate's
middleware and dramatiq's), so the failure pipeline, listed first, sees every outcome of the
steps inside it. The list of steps lives in ``celery_guard.steps``; ``GuardedTask`` only runs
it, so a new feature adds a step there and leaves the task class alone.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from celery_guard.core import headers
from celery_guard.core.options import GuardOption, OptionSet

#: The continuation a run-side step calls: the steps inside it, then the task body.
CallNext = Callable[..., Any]


class Delivery:
    """One delivery of a guarded task, as every run-side step reads it.

    Made once per delivery by :meth:`Pipeline.run`, so the steps share one look-up of the
    task's request (a thread-local stack read, several Python calls in Celery) and one read
    of its guard header instead of one each.

    Attributes:
        task: The guarded task being run.
        args: Positional arguments of the body.
        kwargs: Keyword arguments of the body.
        request: ``task.request`` of this delivery.
        guard: The guard header the request carries (empty when none).
    """

    __slots__ = ("args", "guard", "kwargs", "request", "task")

    def __init__(self, task: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.task = task
        self.args = args
        self.kwargs = kwargs
        self.request = request = task.request
        self.guard: Mapping[str, Any] = headers.read(getattr(request, "headers", None))


@dataclass
class Publish:
    """One publish being prepared: what the steps read, and the header fields they add.

    Attributes:
        task: The guarded task being published.
        args: Positional arguments of the call.
        kwargs: Keyword arguments of the call.
        per_call: The validated per-call guard options (a retry's inherited ones included).
        inherited: The guard header of the message being republished (a retry), or empty.
        fields: Guard header fields the steps stamp; ``None`` values are left out.
    """

    task: Any
    args: Sequence[Any] | None
    kwargs: Mapping[str, Any] | None
    per_call: Mapping[str, Any]
    inherited: Mapping[str, Any] = field(default_factory=dict)
    fields: dict[str, Any] = field(default_factory=dict)


class Step:
    """One feature's part in the pipeline; every hook passes through unless overridden."""

    #: Short name of the feature, for logs and docs.
    name: ClassVar[str] = ""
    #: The guard options this step owns (decorator and, where allowed, per call).
    options: ClassVar[tuple[GuardOption, ...]] = ()

    def check(self, task_options: Mapping[str, Any], where: str) -> None:
        """Check a task's validated options together, at decoration time.

        Raises:
            TypeError, ValueError: Options that do not fit together (the message names them).
        """

    def prepare(self, publish: Publish) -> None:
        """Validate a publish and add header fields to ``publish.fields``; raise to refuse it."""

    def publish(
        self,
        task: Any,
        header: Mapping[str, Any],
        task_id: str,
        send: Callable[[], Any],
        delay: float = 0.0,
    ) -> Any:
        """Publish through ``send()`` (or not); return the ``AsyncResult`` the caller gets.

        ``delay`` is how many seconds after the publish the message is due (its
        countdown/ETA), 0 when it is due at once.
        """
        return send()

    def around(self, delivery: Delivery, call: Callable[[], Any]) -> Any:
        """Run one delivery: call ``call()`` (the steps inside, then the body)."""
        return call()

    def run(self, task: Any, args: tuple[Any, ...], kwargs: dict[str, Any], call: CallNext) -> Any:
        """Run this step alone around ``call(*args, **kwargs)`` for the running request."""
        return self.around(Delivery(task, args, kwargs), functools.partial(call, *args, **kwargs))


class Pipeline:
    """The ordered steps of guarded tasks, first step outermost."""

    def __init__(self, steps: Iterable[Step]) -> None:
        self.steps: tuple[Step, ...] = tuple(steps)
        self.options = OptionSet(option for step in self.steps for option in step.options)
        # The publish side runs on every enqueue: only the hooks a step overrides are called,
        # so a pass-through hook costs nothing (the run side wraps every step, as before).
        self._preparers = tuple(s.prepare for s in self.steps if _overrides(s, "prepare"))
        self._publishers = tuple(s.publish for s in self.steps if _overrides(s, "publish"))
        # The same for the run side, which wraps every delivery: a step that does not
        # override ``around`` adds no layer around the body.
        self._runners = tuple(s for s in self.steps if _overrides(s, "around"))

    def check(self, task_options: Mapping[str, Any], where: str) -> None:
        """Run every step's :meth:`Step.check` on a task's validated options."""
        for step in self.steps:
            step.check(task_options, where)

    def prepare(self, publish: Publish) -> dict[str, Any]:
        """Run every step's :meth:`Step.prepare`; return the header fields they stamped."""
        for prepare in self._preparers:
            prepare(publish)
        return publish.fields

    def publish(
        self,
        task: Any,
        header: Mapping[str, Any],
        task_id: str,
        send: Callable[[], Any],
        delay: float = 0.0,
    ) -> Any:
        """Publish through every step's :meth:`Step.publish`, the first step outermost."""
        for hook in reversed(self._publishers):
            send = functools.partial(hook, task, header, task_id, send, delay)
        return send()

    def run(self, task: Any, args: tuple[Any, ...], kwargs: dict[str, Any], body: CallNext) -> Any:
        """Run ``body`` inside every step's :meth:`Step.around`, the first step outermost."""
        delivery = Delivery(task, args, kwargs)
        # Partials, not closures: made and called in C, once per step and delivery.
        call: Callable[[], Any] = functools.partial(body, *args, **kwargs)
        for step in reversed(self._runners):
            call = functools.partial(step.around, delivery, call)
        return call()


def _overrides(step: Step, hook: str) -> bool:
    return getattr(type(step), hook) is not getattr(Step, hook)


def publish_delay(countdown: Any, eta: Any, tz: dt.tzinfo = dt.timezone.utc) -> float:
    """Seconds from now until a message published with ``countdown``/``eta`` is due (>= 0).

    A naive ``eta`` is in ``tz`` (pass the app's timezone, as Celery reads it); anything
    that is not a number or a datetime counts as due now: Celery refuses it at the publish.
    """
    if isinstance(eta, dt.datetime):
        aware = eta if eta.tzinfo is not None else eta.replace(tzinfo=tz)
        return max(0.0, (aware - dt.datetime.now(dt.timezone.utc)).total_seconds())
    if isinstance(countdown, (int, float)) and not isinstance(countdown, bool):
        return max(0.0, float(countdown))
    return 0.0


def is_guarded(task: Any) -> bool:
    """Whether ``task`` is a guarded task (without importing the task class)."""
    return isinstance(getattr(task, "guard_pipeline", None), Pipeline)
