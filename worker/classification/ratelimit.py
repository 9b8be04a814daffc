"""A cluster-wide limit on LLM calls per second, and a shared pause when the provider says "429".

Pacing is GCRA in its reservation form (``scripts/reserve.lua``), kept in one Redis key
(``RedisKeys.llm_rate``) on the Redis clock so every replica shares it and their clocks do not
matter. Each call reserves the next free slot: ``slot = max(next_free, now - burst × interval)``,
then ``next_free = slot + interval``, and the caller sleeps until its slot. After a quiet spell ``burst + 1`` calls go out at once
(``burst = ceil(LLM_MAX_RPS / 10)``), then they are evenly spaced.

The bound: any one-second window sees at most ``ceil(LLM_MAX_RPS) + burst`` calls. A window holds
the slots of ``1 s + burst × interval + lag`` where ``lag`` is how late a call leaves after its
slot (event loop, network). So the interval is ``(1 s + LAG_ALLOWANCE_S) / LLM_MAX_RPS``: the
pace is about 5 % under the limit, and a call leaving up to 50 ms late still cannot add a call to
any window. (Lag is largest when load arrives after a quiet spell: a replica that just received a
prefetch-worth of deliveries works through them before its first calls leave; 25-40 ms was seen.)

Each replica keeps at most one reservation outstanding (its callers queue locally, in order), so a
caller that gives up while queued wastes no slot and reservations never run far ahead of real calls.

A 429 answer's ``Retry-After`` becomes a cool-down (``RedisKeys.llm_cooldown``, only ever
lengthened, ``scripts/cool_down.lua``): while it lasts no replica starts a call, so waits for
``Retry-After`` hold across replicas and across the worker's own retries of a message.

Without Redis (or while it is unreachable) the same algorithm runs inside the process: the limit
then holds per replica.
"""

from __future__ import annotations

import asyncio
import math
from typing import Final

import structlog

from worker.redisio.keys import RedisKeys
from worker.redisio.link import REDIS_ERRORS, RedisLink
from worker.redisio.scripts import LuaScript

log = structlog.get_logger("worker.classification.ratelimit")

RESERVE = LuaScript("worker.classification", "reserve.lua")
COOL_DOWN = LuaScript("worker.classification", "cool_down.lua")

# How late a call may leave after its slot without breaking the bound (see the module docstring).
LAG_ALLOWANCE_S: Final = 0.05


def interval_s(max_rps: float) -> float:
    """Time between two slots (0: unlimited)."""
    return (1 + LAG_ALLOWANCE_S) / max_rps if max_rps > 0 else 0.0


def burst_for(max_rps: float) -> int:
    """Calls allowed at once after a quiet spell, on top of the steady rate."""
    return math.ceil(max_rps / 10) if max_rps > 0 else 0


def window_limit(max_rps: float) -> int:
    """The most calls any one-second window can see (0: unlimited)."""
    return math.ceil(max_rps) + burst_for(max_rps) if max_rps > 0 else 0


class LocalPacer:
    """The same reservation algorithm on the event loop's clock, for one process."""

    def __init__(self, max_rps: float) -> None:
        self._interval_s = interval_s(max_rps)
        self._burst_s = burst_for(max_rps) * self._interval_s
        self._next_free = 0.0
        self._cool_until = 0.0

    def cooling_for(self, now: float) -> float:
        """Seconds left of the cool-down (0 when there is none)."""
        return max(0.0, self._cool_until - now)

    def reserve(self, now: float) -> tuple[bool, float]:
        """``(reserved, wait_s)``; not reserved while a cool-down lasts: ask again after ``wait_s``."""
        if self._cool_until > now:
            return False, self._cool_until - now
        if self._interval_s <= 0:
            return True, 0.0
        slot = max(self._next_free, now - self._burst_s)
        self._next_free = slot + self._interval_s
        return True, max(0.0, slot - now)

    def cool_down(self, now: float, seconds: float) -> None:
        self._cool_until = max(self._cool_until, now + seconds)


class RateLimiter:
    """``await acquire()`` before each LLM call; ``await cool_down(s)`` after a 429."""

    def __init__(self, max_rps: float, keys: RedisKeys, link: RedisLink | None = None) -> None:
        self.max_rps = max_rps
        self._link = link
        # Rounded up, so rounding can only make the pace slower than asked, never faster.
        interval_us = math.ceil(interval_s(max_rps) * 1_000_000)
        self._interval_us = str(interval_us)
        self._burst_us = str(burst_for(max_rps) * interval_us)
        self._rate_key = keys.llm_rate
        self._cool_key = keys.llm_cooldown
        self._local = LocalPacer(max_rps)
        # One outstanding reservation per replica: only needed when there are slots to reserve.
        self._turn = asyncio.Lock() if max_rps > 0 else None
        if self._link is not None:
            self._reserve_script = RESERVE.register(self._link.client)
            self._cool_down_script = COOL_DOWN.register(self._link.client)
        self.waits = 0
        self.wait_ms = 0
        self.cool_downs = 0

    @property
    def shared(self) -> bool:
        """True while the limit is enforced for the whole cluster (through Redis)."""
        return self._link is not None and self._link.available

    async def acquire(self) -> float:
        """Wait until this replica may start one LLM call; returns the seconds waited."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        if self._turn is None:
            await self._wait_for_slot()
        else:
            async with self._turn:
                await self._wait_for_slot()
        waited_s = loop.time() - started
        if waited_s >= 0.001:
            self.waits += 1
            self.wait_ms += round(waited_s * 1000)
        return waited_s

    async def _wait_for_slot(self) -> None:
        while True:
            reserved, wait_s = await self._reserve()
            if wait_s > 0:
                await asyncio.sleep(wait_s)
            if reserved:
                return

    async def _reserve(self) -> tuple[bool, float]:
        now = asyncio.get_running_loop().time()
        # Our own cool-down holds even when the shared one could not be written.
        cooling_s = self._local.cooling_for(now)
        if cooling_s > 0:
            return False, cooling_s
        if not self.shared:
            return self._local.reserve(now)
        assert self._link is not None
        try:
            reserved, wait_us = await self._reserve_script(
                keys=[self._rate_key, self._cool_key], args=[self._interval_us, self._burst_us]
            )
        except REDIS_ERRORS as exc:
            self._link.report_aside(exc)
            return self._local.reserve(now)
        return bool(reserved), int(wait_us) / 1_000_000

    async def cool_down(self, seconds: float) -> None:
        """Hold every call (of the cluster, with Redis) for ``seconds`` from now."""
        if seconds <= 0:
            return
        self.cool_downs += 1
        self._local.cool_down(asyncio.get_running_loop().time(), seconds)
        if not self.shared:
            return
        assert self._link is not None
        try:
            await self._cool_down_script(keys=[self._cool_key], args=[math.ceil(seconds * 1000)])
        except REDIS_ERRORS as exc:
            self._link.report_aside(exc)

    def snapshot(self) -> dict[str, int]:
        return {
            "rate_limit_waits": self.waits,
            "rate_limit_wait_ms": self.wait_ms,
            "rate_limit_cool_downs": self.cool_downs,
        }
