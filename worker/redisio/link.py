"""The replica's connection to Redis: its state, what each Redis error means, and recovery.

Components that use Redis ask ``available`` before a call and hand any error of a call to
``report_failure``, which classifies it (``classify``) and answers what it is:

- ``UNAVAILABLE``: Redis cannot be reached or cannot serve now (connection, timeout, ``LOADING``,
  ``CLUSTERDOWN``, ``TRYAGAIN``, ``MASTERDOWN``, ``READONLY`` from a demoted master). The link logs
  ``⚠️ Redis connection failed`` once and PINGs with backoff in the background until Redis
  answers, then logs ``✅ Redis cache connected``; meanwhile ``REDIS_FAILURE_MODE`` applies
  (claims wait, then fall back to memory; see ``worker.claims.fallback``). ``outage_s`` says how
  long the outage has lasted. Behind Sentinel, the new connection of that PING asks the sentinels
  for the master again (``worker.redisio.sentinel``).
- ``NOT_WRITABLE``: Redis answers but refuses writes (``OOM`` under ``noeviction``). No fallback:
  a done marker that cannot be written must not be replaced by memory, so claims wait and
  completions are held and retried. ``problem`` says why until a write succeeds again
  (``writes_succeeded``); the warning, naming the maxmemory, is logged at most once a minute.
- ``REFUSED``: the configuration refuses the worker (``NOPERM``, ``WRONGPASS``/``NOAUTH``, an
  unknown command such as ``EVALSHA`` on a sentinel's port). Logged once as an error with the fix;
  claims wait as for ``NOT_WRITABLE`` until a call succeeds (an ``ACL SETUSER`` applies at once).

Anything else (a bug in a script, bad arguments) is re-raised by ``report_failure``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple

import structlog
from redis.asyncio import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from worker.core.redaction import redact_url, scrub
from worker.redisio.clients import RedisClient, ping
from worker.redisio.faults import NOT_WRITABLE_LINE as NOT_WRITABLE_LINE  # and classify here
from worker.redisio.faults import REDIS_ERRORS as REDIS_ERRORS  # re-exported: callers catch
from worker.redisio.faults import REDIS_UNAVAILABLE as REDIS_UNAVAILABLE
from worker.redisio.faults import SENTINEL_FIX, ReplicasBehind, refusal_fix, warn_not_writable
from worker.redisio.faults import RedisFault as RedisFault
from worker.redisio.faults import classify as classify
from worker.redisio.sentinel import SentinelMasterRedis, server_mode

log = structlog.get_logger("worker.redis")

CONNECTED_LINE = "✅ Redis cache connected"
FAILED_LINE = "⚠️ Redis connection failed"
REFUSED_LINE = "⛔ Redis refused the worker"
FALLBACK_IN_MEMORY = "in-memory claims, cache and counters until Redis is back"
FALLBACK_STRICT = "none (REDIS_FAILURE_MODE=strict): no new message is taken until Redis is back"
FALLBACK_NONE = "none: no new message is claimed until Redis accepts the worker's commands"
NOT_WRITABLE_WARN_EVERY_S = 60.0


@dataclass(frozen=True, slots=True)
class LinkProblem:
    """Why Redis answers but cannot take the worker's writes (``reason``: one line, no secret)."""

    fault: RedisFault
    reason: str


class LinkLines(NamedTuple):
    """What a link logs when its Redis answers and when it fails, and the setting naming it."""

    connected: str
    failed: str
    setting: str


CLAIMS_LINES = LinkLines(CONNECTED_LINE, FAILED_LINE, "REDIS_URL")
# The cache Redis's own lines: they contain neither contract line, so a grep for those still
# finds only the claims Redis, and they name the variable an operator has to look at.
CACHE_LINES = LinkLines(
    "✅ Cache Redis (REDIS_CACHE_URL) connected",
    "⚠️ Cache Redis (REDIS_CACHE_URL) connection failed",
    "REDIS_CACHE_URL",
)
FALLBACK_NO_SHARED_CACHE = (
    "classification without the shared cache until it is back (claims and counters unaffected)"
)


class LinkState(StrEnum):
    CONNECTED = "redis_connected"
    DISCONNECTED = "redis_disconnected"


class RedisLink:
    """Tracks whether Redis answers and takes writes, and brings it back after an outage."""

    def __init__(
        self,
        client: RedisClient,
        url: str,
        *,
        secrets: tuple[str, ...] = (),
        max_backoff_s: float = 1.0,
        fallback: str = FALLBACK_IN_MEMORY,
        lines: LinkLines = CLAIMS_LINES,
    ) -> None:
        self.client = client
        self.lines = lines
        self._where = redact_url(url)
        self._secrets = secrets
        self._max_backoff_s = max_backoff_s
        self._fallback = fallback
        self.state = LinkState.DISCONNECTED
        self.problem: LinkProblem | None = None
        self._down_since: float | None = None
        self._recovery: asyncio.Task[None] | None = None
        self._on_recovery: list[Callable[[], Awaitable[None]]] = []
        self._refusals_logged: set[str] = set()
        self._at_sentinel = False  # REDIS_URL names a sentinel's port (see ``connect``)
        self._not_writable_warned_at = self._accepting_logged_at = -NOT_WRITABLE_WARN_EVERY_S
        self._warning: asyncio.Task[None] | None = None

    @property
    def available(self) -> bool:
        return self.state is LinkState.CONNECTED

    @property
    def outage_s(self) -> float:
        """Seconds since Redis was found unreachable (0 while it answers)."""
        if self._down_since is None or self.available:
            return 0.0
        return time.monotonic() - self._down_since

    def on_recovery(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Run ``callback`` each time Redis becomes reachable again."""
        self._on_recovery.append(callback)

    async def connect(self) -> bool:
        """Try once; on failure keep working (callers fall back or wait) and retry in the
        background. A sentinel's port answers PING too: ``HELLO`` tells it from a server."""
        if isinstance(self.client, SentinelMasterRedis):
            self.client.follow_master()  # from now on, whether Redis answers yet or not
        try:
            await ping(self.client)
            mode = None if isinstance(self.client, RedisCluster) else await server_mode(self.client)
        except REDIS_ERRORS as exc:
            self.report_failure(exc)
            return False
        if mode == b"sentinel":
            self._at_sentinel = True
            self._refused(ResponseError("the server is a sentinel"))
            self.state = LinkState.CONNECTED
            return False
        self.state = LinkState.CONNECTED
        self._down_since = None
        log.info(self.lines.connected, redis=self._where, setting=self.lines.setting)
        return True

    def report_failure(self, exc: BaseException) -> RedisFault:
        """What ``exc`` means (``classify``), acted on: an outage starts recovering, a refused
        write or command becomes ``problem``. Re-raises ``exc`` when it is none of them."""
        fault = classify(exc)
        if fault is None:
            raise exc
        if fault is RedisFault.NOT_WRITABLE:
            self._not_writable(exc)
        elif fault is RedisFault.REFUSED:
            self._refused(exc)
            if isinstance(exc, RedisConnectionError):  # a refused AUTH: no connection either
                self._start_recovery(exc, quiet=True)
        else:
            self._start_recovery(exc)
        return fault

    def report_aside(self, exc: BaseException) -> RedisFault:
        """As ``report_failure``, for a call the claims do not depend on (cache, single flight,
        rate limit, heartbeats, stats): an outage and a full Redis count, but a refusal is only
        logged (once, with its fix), so a permission only the stats need cannot stop processing."""
        fault = classify(exc)
        if fault is None:
            raise exc
        if fault is RedisFault.UNAVAILABLE:
            self._start_recovery(exc)
        elif fault is RedisFault.REFUSED:
            self._log_refusal(exc, self._fix_for(exc))
        else:
            self._not_writable(exc)  # Redis is full for everybody: the claims wait too
        return fault

    def writes_succeeded(self, *, scripts: bool = True) -> None:
        """A write went through: Redis has room again, and, when it ran the worker's scripts
        (``scripts``), whatever refused them is over too (said at most once a minute: a Redis
        at its limit lets some writes through)."""
        problem = self.problem
        if problem is None or not (scripts or problem.fault is RedisFault.NOT_WRITABLE):
            return
        self.problem = None
        now = time.monotonic()
        if now - self._accepting_logged_at >= NOT_WRITABLE_WARN_EVERY_S:
            self._accepting_logged_at = now
            log.info("redis_accepting_again", was=problem.fault.value)

    def _error_text(self, exc: BaseException) -> str:
        return scrub(f"{type(exc).__name__}: {exc}", self._secrets)

    def _fix_for(self, exc: BaseException) -> str:
        return SENTINEL_FIX if self._at_sentinel else refusal_fix(exc)

    def _refused(self, exc: BaseException) -> None:
        fix = self._fix_for(exc)
        self.problem = LinkProblem(RedisFault.REFUSED, f"Redis refused the worker: {fix}")
        self._log_refusal(exc, fix, fallback=FALLBACK_NONE)

    def _log_refusal(self, exc: BaseException, fix: str, *, fallback: str = "") -> None:
        """The error line, once per fix for the life of the replica."""
        if fix in self._refusals_logged:
            return
        self._refusals_logged.add(fix)
        extra = {"fallback": fallback} if fallback else {}
        log.error(REFUSED_LINE, redis=self._where, error=self._error_text(exc), fix=fix, **extra)

    def _not_writable(self, exc: BaseException) -> None:
        if isinstance(exc, ReplicasBehind):  # only completions wait (``fallback``), not claims
            self._warn_at_most_every_minute(exc)
            return
        self.problem = LinkProblem(
            RedisFault.NOT_WRITABLE,
            "Redis refuses writes (OOM: used memory is over maxmemory under noeviction); "
            "claims wait until it has room",
        )
        self._warn_at_most_every_minute(exc)

    def _warn_at_most_every_minute(self, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._not_writable_warned_at < NOT_WRITABLE_WARN_EVERY_S:
            return
        self._not_writable_warned_at = now
        error = self._error_text(exc)
        if isinstance(exc, ReplicasBehind):
            log.warning("redis_replicas_behind", redis=self._where, error=error, retry="held")
        elif self._warning is None or self._warning.done():
            warning = warn_not_writable(self.client, self._where, error, FALLBACK_NONE)
            self._warning = asyncio.get_running_loop().create_task(warning)

    def _start_recovery(self, exc: BaseException, *, quiet: bool = False) -> None:
        """Mark Redis down (logging the failure line once per outage) and start recovering."""
        if self._recovery is not None and not self._recovery.done():
            return
        self.state = LinkState.DISCONNECTED
        self._down_since = time.monotonic()
        if not quiet:
            log.warning(
                self.lines.failed,
                redis=self._where,
                setting=self.lines.setting,
                error=self._error_text(exc),
                fallback=self._fallback,
            )
        self._recovery = asyncio.get_running_loop().create_task(self._recover())

    async def _recover(self) -> None:
        # PING often (a short outage should cost no more than it lasts) but never in a tight loop.
        delay_s = 0.1
        while True:
            await asyncio.sleep(delay_s)
            try:
                await ping(self.client)
            except REDIS_ERRORS as exc:
                if classify(exc) is RedisFault.REFUSED:
                    self._refused(exc)
                delay_s = min(delay_s * 2, self._max_backoff_s)
                continue
            break
        outage_s = round(self.outage_s, 1)
        self.state = LinkState.CONNECTED
        self._down_since = None
        self._recovery = None  # a failure from here on starts a new recovery
        if self.problem is not None and self.problem.fault is RedisFault.REFUSED:
            self.problem = None  # the credentials are accepted now (a NOPERM would come back)
        log.info(
            self.lines.connected,
            redis=self._where,
            setting=self.lines.setting,
            recovered=True,
            outage_s=outage_s,
        )
        for callback in self._on_recovery:
            try:
                await callback()
            except REDIS_ERRORS as exc:
                log.warning("redis_recovery_step_failed", error=type(exc).__name__)

    async def aclose(self) -> None:
        for task in (self._recovery, self._warning):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.client.aclose()
