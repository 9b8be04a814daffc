"""Single flight across replicas: of all replicas missing the same cache key, one computes it.

Protocol, per cache key, with a short lock ``{prefix}lock:{classifier}:{text_hash}``:

- The replica that misses takes the lock (``SET NX PX``, a token of its own). Holding it, it reads
  the cache once more (another replica may have finished between its miss and its lock), computes,
  writes the cache, and only then deletes the lock (owner-checked in Lua). So a lock that is gone
  with no cached value means its owner failed, gave up or died.
- While the owner computes, one task per replica renews every lock it holds in a single script call
  every third of ``LOCK_TTL_S``: a live owner keeps its lock however long its computation takes,
  and a dead owner's lock lapses within ``LOCK_TTL_S``.
- A replica that finds the lock taken polls it (every 20 ms at first, then up to every 100 ms; the
  polls of all its waiters share one ``MGET``) until it is gone or ``SINGLE_FLIGHT_WAIT_S`` has
  passed, then re-reads the cache. A value is a hit. No value after the lock went away: it tries to
  take the lock itself. No value when the wait ran out: it computes without the lock, paying twice
  rather than waiting forever.

Without a reachable Redis every replica simply computes for itself (the in-replica single flight
in ``classify`` still shares one computation between concurrent messages of a replica).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from collections.abc import Awaitable, Callable, Sequence
from enum import Enum
from typing import Final, TypeVar

import structlog

from worker.batching import MicroBatcher
from worker.redis_link import REDIS_UNAVAILABLE, RedisLink

log = structlog.get_logger("worker.singleflight")

T = TypeVar("T")

LOCK_TTL_S: Final = 5.0
POLL_MIN_S: Final = 0.02
POLL_MAX_S: Final = 0.1

RENEW_LUA: Final = """
local out = {}
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[i + 1] then
    redis.call('PEXPIRE', KEYS[i], ARGV[1])
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"""

RELEASE_LUA: Final = """
local out = {}
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[i] then
    redis.call('DEL', KEYS[i])
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"""


class LockState(Enum):
    ACQUIRED = "acquired"
    HELD = "held"  # by another computation (of this or another replica)
    UNAVAILABLE = "unavailable"  # Redis could not be asked


class ClusterLocks:
    """Short, renewed, owner-checked locks in Redis; every operation is micro-batched."""

    def __init__(self, link: RedisLink, *, ttl_s: float = LOCK_TTL_S) -> None:
        self._link = link
        self._ttl_s = ttl_s
        self._ttl_ms = str(max(1, round(ttl_s * 1000)))
        self._token_prefix = uuid.uuid4().hex[:12]
        self._sequence = itertools.count(1)
        self._held: dict[str, str] = {}
        self._renewer: asyncio.Task[None] | None = None
        self._renew_script = link.client.register_script(RENEW_LUA)
        self._release_script = link.client.register_script(RELEASE_LUA)
        self._acquires: MicroBatcher[tuple[str, str], bool] = MicroBatcher(self._acquire_batch)
        self._releases: MicroBatcher[tuple[str, str], bool] = MicroBatcher(self._release_batch)
        self._probes: MicroBatcher[str, bool] = MicroBatcher(self._probe_batch)

    @property
    def available(self) -> bool:
        return self._link.available

    async def acquire(self, key: str) -> tuple[LockState, str]:
        """Try to take ``key``: ``(ACQUIRED, token)``, ``(HELD, "")`` or ``(UNAVAILABLE, "")``."""
        if not self._link.available:
            return LockState.UNAVAILABLE, ""
        token = f"{self._token_prefix}:{next(self._sequence)}"
        try:
            taken = await self._acquires.submit((key, token))
        except REDIS_UNAVAILABLE as exc:
            self._link.report_failure(exc)
            return LockState.UNAVAILABLE, ""
        if not taken:
            return LockState.HELD, ""
        self._held[key] = token
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(self._renew_forever())
        return LockState.ACQUIRED, token

    async def release(self, key: str, token: str) -> None:
        """Give ``key`` back if we still own it (if Redis is down it lapses by itself)."""
        if self._held.get(key) == token:
            del self._held[key]
        if not self._link.available:
            return
        try:
            await self._releases.submit((key, token))
        except REDIS_UNAVAILABLE as exc:
            self._link.report_failure(exc)

    async def wait_released(self, key: str, timeout_s: float) -> bool | None:
        """Poll until ``key`` is gone: True; False when ``timeout_s`` passed; None if Redis failed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        delay_s = POLL_MIN_S
        while True:
            remaining_s = deadline - loop.time()
            if remaining_s <= 0:
                return False
            await asyncio.sleep(min(delay_s, remaining_s))
            delay_s = min(delay_s * 1.5, POLL_MAX_S)
            if not self._link.available:
                return None
            try:
                if not await self._probes.submit(key):
                    return True
            except REDIS_UNAVAILABLE as exc:
                self._link.report_failure(exc)
                return None

    async def renew_held(self) -> None:
        """Extend every lock this replica holds (one script call); drop those it lost."""
        if not self._held or not self._link.available:
            return
        keys = list(self._held)
        tokens = [self._held[key] for key in keys]
        try:
            renewed = await self._renew_script(keys=keys, args=[self._ttl_ms, *tokens])
        except REDIS_UNAVAILABLE as exc:
            self._link.report_failure(exc)
            return
        for key, token, ok in zip(keys, tokens, renewed, strict=True):
            if not ok and self._held.get(key) == token:
                del self._held[key]
                log.warning("single_flight_lock_lost", note="another replica may compute it too")

    async def _renew_forever(self) -> None:
        while self._held:
            await asyncio.sleep(self._ttl_s / 3)
            await self.renew_held()

    async def _acquire_batch(self, batch: list[tuple[str, str]]) -> list[bool]:
        pipe = self._link.client.pipeline(transaction=False)
        for key, token in batch:
            pipe.set(key, token, nx=True, px=int(self._ttl_ms))
        return [bool(answer) for answer in await pipe.execute()]

    async def _release_batch(self, batch: list[tuple[str, str]]) -> list[bool]:
        keys = [key for key, _ in batch]
        tokens = [token for _, token in batch]
        return [bool(x) for x in await self._release_script(keys=keys, args=tokens)]

    async def _probe_batch(self, keys: list[str]) -> Sequence[bool]:
        values: list[bytes | None] = await self._link.client.mget(keys)
        return [value is not None for value in values]

    async def aclose(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
        for batcher in (self._acquires, self._releases, self._probes):
            await batcher.aclose()


class ClusterFlight:
    """Runs the protocol of the module docstring around a read and a compute of one key."""

    def __init__(self, locks: ClusterLocks, *, wait_s: float) -> None:
        self._locks = locks
        self._wait_s = wait_s
        self.waits = 0
        self.wait_timeouts = 0
        self.takeovers = 0

    async def run(
        self,
        lock_key: str,
        read: Callable[[], Awaitable[T | None]],
        compute: Callable[[], Awaitable[T]],
    ) -> tuple[T, bool]:
        """``(value, computed_here)``: ``read`` the shared value or ``compute`` (and store) it once.

        ``compute`` must have stored its value where ``read`` finds it before it returns.
        """
        deadline = asyncio.get_running_loop().time() + self._wait_s
        while True:
            state, token = await self._locks.acquire(lock_key)
            if state is LockState.UNAVAILABLE:
                return await compute(), True
            if state is LockState.ACQUIRED:
                try:
                    found = await read()
                    if found is not None:
                        return found, False
                    return await compute(), True
                finally:
                    # Shielded: a cancelled owner still frees its waiters at once.
                    await asyncio.shield(self._locks.release(lock_key, token))
            self.waits += 1
            remaining_s = deadline - asyncio.get_running_loop().time()
            released = await self._locks.wait_released(lock_key, remaining_s)
            found = await read()
            if found is not None:
                return found, False
            if released is None:
                return await compute(), True
            if not released:
                self.wait_timeouts += 1
                log.warning("single_flight_wait_timed_out", wait_s=self._wait_s)
                return await compute(), True
            self.takeovers += 1  # the owner went away without a value: try to be the owner

    async def aclose(self) -> None:
        await self._locks.aclose()

    def snapshot(self) -> dict[str, int]:
        return {
            "single_flight_cluster_waits": self.waits,
            "single_flight_wait_timeouts": self.wait_timeouts,
            "single_flight_takeovers": self.takeovers,
        }
