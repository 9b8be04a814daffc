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
from typing import NamedTuple

import hiredis
import structlog
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import EncodableT

from worker.core.redaction import redact_url, scrub

log = structlog.get_logger("worker.redis")

# Failures that mean "Redis is not reachable right now" (not a bug in a command or a script).
REDIS_UNAVAILABLE: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    OSError,
    asyncio.TimeoutError,
)

CONNECTED_LINE = "✅ Redis cache connected"
FAILED_LINE = "⚠️ Redis connection failed"
FALLBACK_IN_MEMORY = "in-memory claims, cache and counters until Redis is back"
FALLBACK_STRICT = "none (REDIS_FAILURE_MODE=strict): no new message is taken until Redis is back"


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


def make_redis(url: str, timeout_s: float) -> Redis:
    """A client for ``url`` with timeouts, so an outage fails calls instead of hanging them, and
    commands packed by hiredis (see ``packed_by_hiredis``)."""
    client = Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry_on_timeout=False,
        health_check_interval=0,
    )
    pool = client.connection_pool
    pool.connection_class = packed_by_hiredis(pool.connection_class)
    return client


def packed_by_hiredis(connection_class: type[AbstractConnection]) -> type[AbstractConnection]:
    """``connection_class`` packing commands with hiredis's C packer.

    redis-py's synchronous client packs with hiredis when it is installed; its asyncio client
    always packs in Python, about 0.8 µs per argument. The worker's scripts carry several
    arguments per message, so that was a tenth of a message's cost. The bytes are the same RESP.
    """

    class HiredisPacking(connection_class):  # type: ignore[valid-type,misc]
        def pack_command(self, *args: EncodableT) -> list[bytes]:
            return pack_with_hiredis(args)

    HiredisPacking.__name__ = HiredisPacking.__qualname__ = (
        f"HiredisPacking{connection_class.__name__}"
    )
    return HiredisPacking


def pack_with_hiredis(args: tuple[EncodableT, ...]) -> list[bytes]:
    """What redis-py's ``HiredisRespSerializer.pack`` does (a multi-word command name is split)."""
    first = args[0]
    if isinstance(first, str):
        args = (*first.encode().split(), *args[1:])
    elif isinstance(first, bytes) and b" " in first:
        args = (*first.split(), *args[1:])
    try:
        return [hiredis.pack_command(args)]  # type: ignore[arg-type]
    except TypeError as exc:
        raise DataError(str(exc)) from exc


class RedisLink:
    """Tracks whether Redis answers, and brings it back after an outage."""

    def __init__(
        self,
        client: Redis,
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
            await self.client.ping()  # type: ignore[misc]
        except REDIS_UNAVAILABLE as exc:
            self.report_failure(exc)
            return False
        self.state = LinkState.CONNECTED
        self._down_since = None
        log.info(self.lines.connected, redis=self._where, setting=self.lines.setting)
        return True

    def report_failure(self, exc: BaseException) -> None:
        """Mark Redis down (logging the failure line once per outage) and start recovering."""
        if self._recovery is not None and not self._recovery.done():
            return
        self.state = LinkState.DISCONNECTED
        self._down_since = time.monotonic()
        log.warning(
            self.lines.failed,
            redis=self._where,
            setting=self.lines.setting,
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
                await self.client.ping()  # type: ignore[misc]
            except REDIS_UNAVAILABLE:
                delay_s = min(delay_s * 2, self._max_backoff_s)
                continue
            break
        outage_s = round(self.outage_s, 1)
        self.state = LinkState.CONNECTED
        self._down_since = None
        self._recovery = None  # a failure from here on starts a new recovery
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
            except REDIS_UNAVAILABLE as exc:
                log.warning("redis_recovery_step_failed", error=type(exc).__name__)

    async def aclose(self) -> None:
        if self._recovery is not None:
            self._recovery.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._recovery
        await self.client.aclose()
