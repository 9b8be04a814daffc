"""The replica's connection to Redis: its state, the contract's log lines, and background recovery.

Components that use Redis ask ``available`` before a call and ``report_failure`` when a call fails;
the link then logs ``⚠️ Redis connection failed`` once, and retries with backoff in the background
until a PING answers, when it logs ``✅ Redis cache connected`` and everybody switches back.
``outage_s`` says how long the current outage has lasted (claims fall back to memory only after
``REDIS_FALLBACK_AFTER_S`` of it, see ``fallback``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from enum import StrEnum

import structlog
from redis.exceptions import ClusterDownError, ClusterError, SlotNotCoveredError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from worker.core.redaction import redact_url, scrub
from worker.redisio.clients import RedisClient, ping

log = structlog.get_logger("worker.redis")

# Failures that mean "Redis is not reachable right now" (not a bug in a command or a script).
# The cluster's: a slot without a master (CLUSTERDOWN), a slot being moved (TRYAGAIN), and the
# client's own "gave up following redirections or reaching the slot's node".
REDIS_UNAVAILABLE: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    OSError,
    asyncio.TimeoutError,
    ClusterDownError,
    TryAgainError,
    SlotNotCoveredError,
    ClusterError,
)

CONNECTED_LINE = "✅ Redis cache connected"
FAILED_LINE = "⚠️ Redis connection failed"
FALLBACK_IN_MEMORY = "in-memory claims, cache and counters until Redis is back"
FALLBACK_STRICT = "none (REDIS_FAILURE_MODE=strict): no new message is taken until Redis is back"


class LinkState(StrEnum):
    CONNECTED = "redis_connected"
    DISCONNECTED = "redis_disconnected"


class RedisLink:
    """Tracks whether Redis answers, and brings it back after an outage."""

    def __init__(
        self,
        client: RedisClient,
        url: str,
        *,
        secrets: tuple[str, ...] = (),
        max_backoff_s: float = 1.0,
        fallback: str = FALLBACK_IN_MEMORY,
    ) -> None:
        self.client = client
        self._where = redact_url(url)
        self._secrets = secrets
        self._max_backoff_s = max_backoff_s
        self._fallback = fallback
        self.state = LinkState.DISCONNECTED
        self._down_since: float | None = None
        self._recovery: asyncio.Task[None] | None = None
        self._on_recovery: list[Callable[[], Awaitable[None]]] = []

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
        """Try once; on failure keep working (callers fall back) and retry in the background."""
        try:
            await ping(self.client)
        except REDIS_UNAVAILABLE as exc:
            self.report_failure(exc)
            return False
        self.state = LinkState.CONNECTED
        self._down_since = None
        log.info(CONNECTED_LINE, redis=self._where)
        return True

    def report_failure(self, exc: BaseException) -> None:
        """Mark Redis down (logging the failure line once per outage) and start recovering."""
        if self._recovery is not None and not self._recovery.done():
            return
        self.state = LinkState.DISCONNECTED
        self._down_since = time.monotonic()
        log.warning(
            FAILED_LINE,
            redis=self._where,
            error=scrub(f"{type(exc).__name__}: {exc}", self._secrets),
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
            except REDIS_UNAVAILABLE:
                delay_s = min(delay_s * 2, self._max_backoff_s)
                continue
            break
        outage_s = round(self.outage_s, 1)
        self.state = LinkState.CONNECTED
        self._down_since = None
        self._recovery = None  # a failure from here on starts a new recovery
        log.info(CONNECTED_LINE, redis=self._where, recovered=True, outage_s=outage_s)
        for callback in self._on_recovery:
            try:
                await callback()
            except REDIS_UNAVAILABLE as exc:
                log.warning("redis_recovery_step_failed", error=type(exc).__name__)

    async def aclose(self) -> None:
        if self._recovery is not None:
            self._recovery.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._recovery
        await self.client.aclose()
