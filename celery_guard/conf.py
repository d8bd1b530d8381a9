"""Typed, lazy access to the ``CELERY_GUARD_*`` Django settings (the only reader of them)."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from datetime import timedelta
from typing import Any, TypeVar
from urllib.parse import urlsplit

from django.conf import settings as django_settings
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed

from celery_guard import backoff, durations

PREFIX = "CELERY_GUARD_"

#: Built-in defaults, keyed by the setting name without its prefix. Every setting the
#: package reads is declared here, so this table is also what the typo check knows.
DEFAULTS: Mapping[str, Any] = {
    "PRIORITY_QUEUES": {"high": "high", "default": "default", "low": "low"},
    "DEFAULT_PRIORITY": "default",
    "MAX_PAYLOAD_BYTES": 256 * 1024,
    "INSTALL_ROUTER": True,
    "MAX_ATTEMPTS": 5,
    "BACKOFF": backoff.Exponential(),
    "DEADLINE": None,
    "UNKNOWN_ERRORS": "transient",
    "ERROR_CLASSIFIER": None,
    "MAX_THROTTLED": 50,
    "MAX_WORKER_LOST": 3,
    "DEAD_LETTER_WRITE_TRIES": 8,
    "SOFT_TIME_LIMIT": None,
    "TIME_LIMIT": None,
    "CAPTURE_UNGUARDED": False,
    "BEAT_LOCK_NAME": "default",
    "BEAT_LEASE_SECONDS": 30,
    "BEAT_POLICIES": {},
    "IDEMPOTENCY_BACKEND": "database",
    "IDEMPOTENCY_REDIS_URL": None,
    "IDEMPOTENCY_REDIS_PREFIX": "celery_guard:idem:",
    "DEDUP_WINDOW": 24 * 3600,
    "IDEMPOTENCY_LEASE": 600,
    "IDEMPOTENCY_PUBLISH_GRACE": 60,
    "IDEMPOTENCY_START_GRACE": 300,
    "IDEMPOTENCY_RETENTION": 7 * 24 * 3600,
    "RELEASE_ON_DEAD_LETTER": True,
    "REDACT_FIELDS": (
        "password",
        "token",
        "secret",
        "authorization",
        "api_key",
        "card",
        "ssn",
    ),
    "REDACTOR": None,
    "DLQ_RETENTION_DAYS": 30,
    "RUNS_RETENTION_DAYS": 30,
    "RUNS_SWEEP_GRACE": 60,
    "SENTRY_EVENT_URL": None,
    "METRICS": True,
    "METRICS_TOKEN": None,
    "ROLLUPS": True,
    "ROLLUP_FLUSH_SECONDS": 10,
    "ROLLUP_RETENTION_DAYS": 14,
    "SLOS": {},
    "ALERT_SINKS": ("log", "mail", "sentry", "webhook"),
    "ALERT_WEBHOOK_URL": None,
    "PLAYBOOK_URL": "https://celery-guard.readthedocs.io/en/latest/observability.html",
    "OUTBOX": False,
    "OUTBOX_GRACE": 2.0,
    "OUTBOX_FAST_PATH": True,
    "OUTBOX_RETENTION": 7 * 24 * 3600,
    "SCHEDULE": "auto",
    "SCHEDULE_REDIS_PREFIX": "celery_guard:schedule:",
    "DELIVERY_POLL_INTERVAL": 1.0,
    "DELIVERY_BATCH": 500,
    "DELIVERY_LEASE": 10.0,
    "DELIVERY_POLLER": True,
    "LIMITS": {},
    "LIMITS_BACKEND": None,
    "LIMITS_REDIS_URL": None,
    "LIMITS_REDIS_PREFIX": "celery_guard:limits:",
    "LIMITS_LEASE": 30,
    "LIMITS_ON_OUTAGE": "run",
    "LIMITS_DEFER_DELAY": 1.0,
    "POLICY_REFRESH": 2.0,
}


def configured() -> bool:
    """Whether Django's settings are configured (a task module may be imported before)."""
    return bool(django_settings.configured)


def declared() -> list[str]:
    """The names of every ``CELERY_GUARD_*`` setting the project sets, known or not."""
    return [name for name in dir(django_settings) if name.startswith(PREFIX)]


def known_settings() -> frozenset[str]:
    """Return the full names of every ``CELERY_GUARD_*`` setting the package reads."""
    return frozenset(PREFIX + name for name in DEFAULTS)


def is_overridden(name: str) -> bool:
    """Tell whether the project sets ``CELERY_GUARD_<name>`` itself."""
    return hasattr(django_settings, PREFIX + name)


#: Values read so far, by setting name (and ``(name, "duration")`` for validated durations),
#: for the settings object in place when they were read. Reading through Django's lazy
#: settings on every publish cost more than the rest of a routing-only enqueue's guard.
#: ``override_settings`` (and pytest-django's ``settings`` fixture) swaps that object and
#: sends ``setting_changed``; either empties the cache.
_cache: dict[Any, Any] = {}
_cached_for: list[object] = [None]
_MISSING = object()


def forget() -> None:
    """Empty the settings cache and :func:`memo`'s values now.

    For code that changes the Celery app's configuration at run time (a test's fixture):
    values derived from it are otherwise kept until the Django settings change.
    """
    _cache.clear()


def _forget(**kwargs: Any) -> None:
    forget()


setting_changed.connect(_forget, dispatch_uid="celery_guard.conf.forget")


#: The lazy settings' own ``__dict__``, where Django keeps the settings object it wraps
#: (``_wrapped``). Django clears this dict when the object is swapped but never replaces it,
#: so one reference serves for the process; reading it skips ``LazyObject.__getattribute__``
#: (a Python call) on every setting read of the hot path.
_lazy_state: dict[str, Any] = object.__getattribute__(django_settings, "__dict__")


def _cached(key: Any) -> Any:
    """The cached value of ``key``, or ``_MISSING`` (the cache follows the settings object)."""
    wrapped = _lazy_state.get("_wrapped")
    if wrapped is not _cached_for[0]:
        _cache.clear()
        _cached_for[0] = wrapped
    return _cache.get(key, _MISSING)


def _keep(key: Any, value: Any) -> None:
    if django_settings.configured:
        _cache[key] = value


_T = TypeVar("_T")


def memo(key: Hashable, compute: Callable[[], _T]) -> _T:
    """``compute()``, kept with the settings cache until the settings change.

    For a value derived from the configuration that a hot path would otherwise work out on
    every task (the Redis URL a Celery broker setting gives: Celery's ``broker_url`` lookup
    costs more than the rest of the look-ups of a run). Emptied by ``override_settings`` and
    ``setting_changed`` like the settings themselves; a value that raises is not kept.
    """
    value = _cached(("memo", key))
    if value is _MISSING:
        value = compute()
        _keep(("memo", key), value)
    return value  # type: ignore[no-any-return]


def raw(name: str) -> Any:
    """Return ``CELERY_GUARD_<name>`` as the project wrote it, or the built-in default."""
    value = _cached(name)
    if value is _MISSING:
        value = getattr(django_settings, PREFIX + name, DEFAULTS[name])
        _keep(name, value)
    return value


#: Duration settings -> the bounds :func:`celery_guard.durations.seconds` applies to them.
#: ``manage.py check`` (E001) and every read below use this one table.
DURATIONS: Mapping[str, Mapping[str, Any]] = {
    "DEDUP_WINDOW": {},
    "IDEMPOTENCY_LEASE": {},
    "IDEMPOTENCY_PUBLISH_GRACE": {},
    "IDEMPOTENCY_START_GRACE": {},
    "IDEMPOTENCY_RETENTION": {},
    "SOFT_TIME_LIMIT": {},
    "TIME_LIMIT": {},
    "BEAT_LEASE_SECONDS": {"maximum": durations.MAX_BEAT_LEASE},
    "DLQ_RETENTION_DAYS": {
        "unit": "days",
        "minimum": durations.MIN_RETENTION_DAYS,
        "allow_minimum": True,
        "maximum": durations.MAX_RETENTION_DAYS,
    },
    # Finished runs hold no history others need: any positive age may be purged.
    "RUNS_RETENTION_DAYS": {"unit": "days", "maximum": durations.MAX_RETENTION_DAYS},
    # 0: the sweep takes over at once (tests, single-process setups).
    "RUNS_SWEEP_GRACE": {"allow_minimum": True},
    # 0: every outcome writes its rollup at once.
    "ROLLUP_FLUSH_SECONDS": {"allow_minimum": True, "maximum": durations.DAY},
    # At least a day: the dashboard reads the last hour, SLO windows are minutes to hours.
    "ROLLUP_RETENTION_DAYS": {
        "unit": "days",
        "minimum": durations.MIN_RETENTION_DAYS,
        "allow_minimum": True,
        "maximum": durations.MAX_RETENTION_DAYS,
    },
    "LIMITS_LEASE": {},
    "LIMITS_DEFER_DELAY": {},
    "POLICY_REFRESH": {},
}
#: Duration settings that may be ``None`` (no limit).
OPTIONAL_DURATIONS = frozenset({"SOFT_TIME_LIMIT", "TIME_LIMIT"})


def duration(name: str) -> float:
    """Return duration setting ``name`` validated (seconds, or days for the retention).

    Raises:
        ImproperlyConfigured: The value is not a finite duration within its bounds (what
            ``manage.py check`` reports as E001), naming the setting: a process that skipped
            the checks still fails clearly instead of deep inside a ledger.
    """
    cached = _cached((name, "duration"))
    if cached is not _MISSING:
        return float(cached)
    try:
        value = durations.seconds(raw(name), **DURATIONS[name])
    except (TypeError, ValueError) as exc:
        raise ImproperlyConfigured(f"{PREFIX}{name}: {exc}") from None
    _keep((name, "duration"), value)
    return value


class _LimitsSettings:
    """The limits feature's settings (see ``docs/limits.md``)."""

    @property
    def limits_backend(self) -> str | None:
        """Where the limits store lives: ``"redis"``, ``"database"``, or ``None`` (chosen)."""
        value = raw("LIMITS_BACKEND")
        return str(value) if value else None

    @property
    def limits_redis_url(self) -> str | None:
        """Redis URL of the limits store; ``None`` means a Redis broker's URL."""
        value = raw("LIMITS_REDIS_URL")
        return str(value) if value else None

    @property
    def limits_redis_prefix(self) -> str:
        """Prefix of every Redis key of the limits store."""
        return str(raw("LIMITS_REDIS_PREFIX"))

    @property
    def limits_lease(self) -> float:
        """Seconds a concurrency slot outlives its last renewal (a SIGKILLed worker's slot)."""
        return duration("LIMITS_LEASE")

    @property
    def limits_on_outage(self) -> str:
        """What a limited run does when the store is unreachable: ``"run"`` or ``"defer"``."""
        return str(raw("LIMITS_ON_OUTAGE"))

    @property
    def limits_defer_delay(self) -> float:
        """Base delay (seconds) of a run deferred by a full concurrency limit or a pause."""
        return duration("LIMITS_DEFER_DELAY")

    @property
    def policy_refresh(self) -> float:
        """Seconds a worker process keeps the task policies before reading them again."""
        return duration("POLICY_REFRESH")


class GuardSettings(_LimitsSettings):
    """Attribute access to the settings; ``override_settings`` applies at once (see ``raw``).

    Values are returned as written; ``celery_guard.checks`` validates them (E001).
    """

    @property
    def priority_queues(self) -> Mapping[str, str]:
        """Priority level name -> Celery queue name."""
        value: Mapping[str, str] = raw("PRIORITY_QUEUES")
        return value

    @property
    def default_priority(self) -> str:
        """Priority level of a guarded task that names none."""
        return str(raw("DEFAULT_PRIORITY"))

    @property
    def max_payload_bytes(self) -> int:
        """Largest JSON body (args and kwargs) a guarded task may publish."""
        return int(raw("MAX_PAYLOAD_BYTES"))

    @property
    def install_router(self) -> bool:
        """Whether guarded tasks put the guard router in front of ``task_routes`` themselves."""
        return bool(raw("INSTALL_ROUTER"))

    @property
    def unknown_errors(self) -> str:
        """How an exception no rule classifies is treated: ``"transient"`` or ``"permanent"``."""
        return str(raw("UNKNOWN_ERRORS"))

    @property
    def error_classifier(self) -> str | None:
        """Dotted path of the project's error classifier, if any."""
        value = raw("ERROR_CLASSIFIER")
        return None if value is None else str(value)

    @property
    def max_throttled(self) -> int:
        """Throttled reschedules a task gets before they start consuming attempts."""
        return int(raw("MAX_THROTTLED"))

    @property
    def max_worker_lost(self) -> int:
        """Deliveries of one task id that may lose their worker before it is dead-lettered."""
        return int(raw("MAX_WORKER_LOST"))

    @property
    def dead_letter_write_tries(self) -> int:
        """Deliveries that may fail to write a dead letter before the guard gives up on it."""
        return int(raw("DEAD_LETTER_WRITE_TRIES"))

    @property
    def soft_time_limit(self) -> float | None:
        """Soft time limit of guarded tasks that set none (seconds)."""
        return None if raw("SOFT_TIME_LIMIT") is None else duration("SOFT_TIME_LIMIT")

    @property
    def time_limit(self) -> float | None:
        """Hard time limit of guarded tasks that set none (seconds)."""
        return None if raw("TIME_LIMIT") is None else duration("TIME_LIMIT")

    @property
    def capture_unguarded(self) -> bool:
        """Whether failures of unguarded Celery tasks are recorded as dead letters too."""
        return bool(raw("CAPTURE_UNGUARDED"))

    @property
    def beat_lock_name(self) -> str:
        """Name of the lease guarded beats compete for (one leader per name)."""
        return str(raw("BEAT_LOCK_NAME"))

    @property
    def beat_lease_seconds(self) -> float:
        """Seconds a beat lease lasts without renewal."""
        return duration("BEAT_LEASE_SECONDS")

    @property
    def beat_policies(self) -> Mapping[str, Any]:
        """Beat entry name (or ``"*"``) -> catch-up / overlap policy dict."""
        value: Mapping[str, Any] = raw("BEAT_POLICIES")
        return value

    @property
    def idempotency_backend(self) -> str:
        """Where the idempotency ledger lives: ``"database"`` or ``"redis"``."""
        return str(raw("IDEMPOTENCY_BACKEND"))

    @property
    def idempotency_redis_url(self) -> str | None:
        """Redis URL of the ``"redis"`` ledger; ``None`` means Celery's broker URL."""
        url = raw("IDEMPOTENCY_REDIS_URL")
        return str(url) if url else None

    @property
    def idempotency_redis_prefix(self) -> str:
        """Prefix of every Redis key the ``"redis"`` ledger writes."""
        return str(raw("IDEMPOTENCY_REDIS_PREFIX"))

    @property
    def dedup_window(self) -> float:
        """Default dedup window in seconds of a task with an idempotency key."""
        return duration("DEDUP_WINDOW")

    @property
    def idempotency_lease(self) -> float:
        """Seconds a worker owns a running key before another attempt may take it over."""
        return duration("IDEMPOTENCY_LEASE")

    @property
    def idempotency_publish_grace(self) -> float:
        """Seconds a claim may stay unconfirmed before another enqueue takes it over."""
        return duration("IDEMPOTENCY_PUBLISH_GRACE")

    @property
    def idempotency_start_grace(self) -> float:
        """Seconds past its countdown/ETA and visibility timeout a published key may wait."""
        return duration("IDEMPOTENCY_START_GRACE")

    @property
    def idempotency_retention(self) -> float:
        """Seconds an expired ledger record is kept before ``purge`` deletes it."""
        return duration("IDEMPOTENCY_RETENTION")

    @property
    def release_on_dead_letter(self) -> bool:
        """Whether a dead-lettered run releases its idempotency key."""
        return bool(raw("RELEASE_ON_DEAD_LETTER"))

    @property
    def use_tz(self) -> bool:
        """Django's ``USE_TZ``: whether datetimes are stored aware (the guarded beat needs it)."""
        return bool(django_settings.USE_TZ)

    @staticmethod
    def seconds(value: Any) -> float:
        """Return a duration setting (seconds or ``timedelta``) in seconds."""
        if isinstance(value, timedelta):
            return value.total_seconds()
        return float(value)

    @property
    def redact_fields(self) -> tuple[str, ...]:
        """Key fragments whose values are masked (case-insensitive substring match)."""
        return tuple(str(name) for name in raw("REDACT_FIELDS"))

    @property
    def redactor(self) -> str | None:
        """Dotted path of the project's redactor hook, if any."""
        value = raw("REDACTOR")
        return None if value is None else str(value)

    @property
    def dlq_retention_days(self) -> float:
        """Age (days) past which replayed or discarded dead letters are purged."""
        return duration("DLQ_RETENTION_DAYS")

    @property
    def runs_retention_days(self) -> float:
        """Age (days since they finished) past which bulk runs and their items are purged."""
        return duration("RUNS_RETENTION_DAYS")

    @property
    def runs_sweep_grace(self) -> float:
        """Seconds without progress after which the sweep publishes a run's items or completion."""
        return duration("RUNS_SWEEP_GRACE")

    @property
    def sentry_event_url(self) -> str | None:
        """URL template of a Sentry event, with ``{event_id}`` in it; None unless http(s).

        The admin renders it as a link: a ``javascript:`` URL would run in the admin's origin
        when clicked (E001 reports it; it is never rendered).
        """
        value = raw("SENTRY_EVENT_URL")
        return str(value) if is_http_url(value) else None

    @property
    def metrics(self) -> bool:
        """Whether events feed Prometheus metrics (when prometheus-client is installed)."""
        return bool(raw("METRICS"))

    @property
    def metrics_token(self) -> str | None:
        """Bearer token that may read ``celery-guard/metrics`` (besides staff users)."""
        value = raw("METRICS_TOKEN")
        return str(value) if value else None

    @property
    def rollups(self) -> bool:
        """Whether events are counted into the per-minute database rollups."""
        return bool(raw("ROLLUPS"))

    @property
    def rollup_flush_seconds(self) -> float:
        """Seconds a process buffers its rollup counts before writing them."""
        return duration("ROLLUP_FLUSH_SECONDS")

    @property
    def rollup_retention_days(self) -> float:
        """Age (days) past which ``purge`` deletes per-minute rollups."""
        return duration("ROLLUP_RETENTION_DAYS")

    @property
    def slos(self) -> Mapping[str, Mapping[str, Any]]:
        """Task name or ``"queue:<name>"`` -> its objectives (see docs/observability.md)."""
        value: Mapping[str, Mapping[str, Any]] = raw("SLOS")
        return value

    @property
    def alert_sinks(self) -> tuple[str, ...]:
        """Where alerts go: any of ``"log"``, ``"mail"``, ``"sentry"``, ``"webhook"``."""
        return tuple(str(name) for name in raw("ALERT_SINKS"))

    @property
    def alert_webhook_url(self) -> str | None:
        """URL that receives a Slack-compatible JSON post per alert; None unless http(s).

        ``urllib`` would also open ``file:`` and ``ftp:`` URLs (E001 reports them; they are
        never opened).
        """
        value = raw("ALERT_WEBHOOK_URL")
        return str(value) if is_http_url(value) else None

    @property
    def playbook_url(self) -> str:
        """Base URL of the alert playbooks (docs/observability.md); anchors are appended."""
        return str(raw("PLAYBOOK_URL"))

    @staticmethod
    def admins() -> list[Any]:
        """Django's ``ADMINS`` (the mail sink's recipients)."""
        return list(getattr(django_settings, "ADMINS", []) or [])

    @property
    def outbox(self) -> bool:
        """Whether ``delay_on_commit`` of every guarded task writes an outbox row."""
        return bool(raw("OUTBOX"))

    @property
    def outbox_grace(self) -> float:
        """Seconds a committed outbox row is left to the fast path before the poller takes it."""
        return self.seconds(raw("OUTBOX_GRACE"))

    @property
    def outbox_fast_path(self) -> bool:
        """Whether a committed outbox row is published at once by the committing process.

        ``False``: the row is due at once and only the delivery poller publishes it (the
        request does no work after its commit; the job waits up to one poll interval).
        """
        return bool(raw("OUTBOX_FAST_PATH"))

    @property
    def outbox_retention(self) -> float:
        """Seconds a dispatched outbox row is kept before ``purge`` deletes it."""
        return self.seconds(raw("OUTBOX_RETENTION"))

    @property
    def schedule(self) -> str | None:
        """Where delayed messages wait: ``"auto"``, ``"redis"``, ``"database"`` or ``None``."""
        value = raw("SCHEDULE")
        return None if value in (None, False) else str(value)

    @property
    def schedule_redis_prefix(self) -> str:
        """Prefix of the Redis keys of the schedule (sorted set and poller lease)."""
        return str(raw("SCHEDULE_REDIS_PREFIX"))

    @property
    def delivery_poll_interval(self) -> float:
        """Seconds between two polls of the delivery poller."""
        return self.seconds(raw("DELIVERY_POLL_INTERVAL"))

    @property
    def delivery_batch(self) -> int:
        """Most due messages or outbox rows one poll publishes."""
        return int(raw("DELIVERY_BATCH"))

    @property
    def delivery_lease(self) -> float:
        """Seconds the active poller's lease lasts without renewal."""
        return self.seconds(raw("DELIVERY_LEASE"))

    @property
    def delivery_poller(self) -> bool:
        """Whether every worker runs the delivery poller (a bootstep)."""
        return bool(raw("DELIVERY_POLLER"))


def is_http_url(value: Any) -> bool:
    """Whether ``value`` is an absolute ``http://`` or ``https://`` URL with a host."""
    if not isinstance(value, str) or any(ord(char) < 33 for char in value):
        # Browsers drop tabs and newlines inside a scheme ("java\tscript:").
        return False
    parts = urlsplit(value)
    return parts.scheme in ("http", "https") and bool(parts.netloc)


guard_settings = GuardSettings()
