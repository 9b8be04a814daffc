"""Claims that survive a Redis outage: Redis while it answers, this process's memory meanwhile.

When a configured Redis stops answering, claims first wait ``REDIS_FALLBACK_AFTER_S`` for it (a
restart or a failover usually fits in that time, and then nothing at all is processed twice);
the consumer holds its deliveries meanwhile. After that, in the default ``fallback`` mode, claims
and done markers live in memory (exact within this replica, blind to the others), every such
message is counted as ``degraded``, and the counts its completion would have added to Redis wait
in the pending deltas. IDs finished during the outage are written back as done markers when Redis
returns, so their duplicates are still recognised.

In ``strict`` mode claims never fall back: the consumer takes no new message until Redis answers
again, and a message finished meanwhile is acknowledged only once its done marker is in Redis.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING

import structlog

from worker.claims.memory_store import MemoryClaimStore
from worker.claims.protocol import ClaimResult, ClaimStatus, CompleteStatus
from worker.claims.redis_store import RedisClaimStore
from worker.core.errors import StoreUnavailable
from worker.observability.counters import Counters
from worker.observability.metrics import CounterName
from worker.redisio.batching import MAX_SCRIPT_BATCH
from worker.redisio.keys import THROUGHPUT_BUCKET_TTL_S, RedisKeys
from worker.redisio.link import REDIS_UNAVAILABLE, RedisLink
from worker.redisio.scripts import LuaScript

if TYPE_CHECKING:
    from worker.claims.protocol import ClaimAsk, Completion, Lease

log = structlog.get_logger("worker.claims")

STRICT_RETRY_MAX_S = 1.0

WRITE_BACK = LuaScript("worker.claims", "write_back.lua", library=("count_completed.lua",))


class FallbackClaimStore:
    """A ``ClaimStore`` that routes each call to Redis or to memory by the link's state.

    ``claim_many`` raises ``StoreUnavailable`` while the claim must wait for Redis (the
    first ``fallback_after_s`` of an outage, or all of it when ``strict``).
    """

    def __init__(
        self,
        redis_store: RedisClaimStore,
        memory_store: MemoryClaimStore,
        *,
        link: RedisLink,
        keys: RedisKeys,
        counters: Counters,
        memory_token_prefix: str,
        dedup_ttl_s: int,
        strict: bool = False,
        fallback_after_s: float = 0.0,
    ) -> None:
        self.lease_s = redis_store.lease_s
        self._redis = redis_store
        self._memory = memory_store
        self._link = link
        self._keys = keys
        self._counters = counters
        self._memory_prefix = memory_token_prefix
        self._dedup_ttl_s = dedup_ttl_s
        self._strict = strict
        self._fallback_after_s = fallback_after_s
        self._memory_announced = False
        # (message ID, what the write-back counts: see write_back.lua)
        self._finished_offline: list[tuple[str, str]] = []
        self._write_back_script = WRITE_BACK.register(link.client)
        link.on_recovery(self.write_back)

    def _in_memory(self, token: str) -> bool:
        return token.startswith(self._memory_prefix)

    def _fall_back(self) -> None:
        """Redis is unreachable: return to claim in memory, or raise to make the claim wait."""
        if self._strict:
            raise StoreUnavailable("Redis is unreachable (REDIS_FAILURE_MODE=strict)")
        if self._link.outage_s < self._fallback_after_s:
            raise StoreUnavailable("Redis is unreachable; claims wait before falling back")
        if not self._memory_announced:
            self._memory_announced = True
            log.warning("claims_in_memory", outage_s=round(self._link.outage_s, 1))

    async def claim_many(self, requests: Sequence[ClaimAsk]) -> list[ClaimResult]:
        done_here = [self._memory.is_done(ask.message_id) for ask in requests]
        if not any(done_here):
            return await self._claim(requests)
        pending = [request for request, done in zip(requests, done_here, strict=True) if not done]
        answers = iter(await self._claim(pending) if pending else [])
        return [ClaimResult(ClaimStatus.DONE) if done else next(answers) for done in done_here]

    async def _claim(self, requests: Sequence[ClaimAsk]) -> list[ClaimResult]:
        if self._link.available:
            try:
                return await self._redis.claim_many(requests)
            except REDIS_UNAVAILABLE as exc:
                self._link.report_failure(exc)
        self._fall_back()
        self._counters.record(CounterName.DEGRADED, len(requests))
        return await self._memory.claim_many(requests)

    async def complete_many(self, items: Sequence[Completion]) -> list[CompleteStatus]:
        """One script call when every claim is in Redis and Redis is there; otherwise each
        completion on its own (``_complete_one``)."""
        if self._link.available and not any(self._in_memory(i.token) for i in items):
            try:
                return await self._redis.complete_many(items)
            except REDIS_UNAVAILABLE as exc:
                self._link.report_failure(exc)
        return [await self._complete_one(item) for item in items]

    async def _complete_one(self, item: Completion) -> CompleteStatus:
        if not self._in_memory(item.token):
            if self._strict:
                return await self._complete_in_redis(item)
            if self._link.available:
                try:
                    return (await self._redis.complete_many([item]))[0]
                except REDIS_UNAVAILABLE as exc:
                    self._link.report_failure(exc)
            # The lease was ours when Redis went away; finish here and tell Redis later.
            self._memory.mark_done(item.message_id)
            self._finished_offline.append((item.message_id, "2" if item.cache_hit else "1"))
            return CompleteStatus.DEFERRED
        if (await self._memory.complete_many([item]))[0] is CompleteStatus.LOST:
            return CompleteStatus.LOST
        self._finished_offline.append((item.message_id, "0"))
        return CompleteStatus.IN_MEMORY

    async def _complete_in_redis(self, item: Completion) -> CompleteStatus:
        """Strict mode: wait for Redis to take the done marker (the delivery stays unacknowledged)."""
        delay_s = 0.1
        while True:
            if self._link.available:
                try:
                    return (await self._redis.complete_many([item]))[0]
                except REDIS_UNAVAILABLE as exc:
                    self._link.report_failure(exc)
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, STRICT_RETRY_MAX_S)

    async def release(self, message_id: str, token: str, *, refund_attempt: bool = False) -> bool:
        if self._in_memory(token):
            return await self._memory.release(message_id, token, refund_attempt=refund_attempt)
        try:
            return await self._redis.release(message_id, token, refund_attempt=refund_attempt)
        except REDIS_UNAVAILABLE as exc:
            self._link.report_failure(exc)
            return False  # the lease expires by itself

    async def renew(self, leases: Sequence[Lease]) -> list[bool]:
        in_redis = [lease for lease in leases if not self._in_memory(lease.token)]
        renewed: dict[Lease, bool] = {}
        if in_redis:
            try:
                renewed.update(zip(in_redis, await self._redis.renew(in_redis), strict=True))
            except REDIS_UNAVAILABLE as exc:
                self._link.report_failure(exc)
                # Nobody can take a Redis lease over while Redis is down: keep working.
                renewed.update((lease, True) for lease in in_redis)
        in_memory = [lease for lease in leases if self._in_memory(lease.token)]
        renewed.update(zip(in_memory, await self._memory.renew(in_memory), strict=True))
        return [renewed[lease] for lease in leases]

    async def write_back(self) -> None:
        """Record in Redis the IDs finished while it was unreachable (and count those claimed in
        Redis, unless their completion reached Redis after all: see write_back.lua)."""
        self._memory_announced = False
        finished, self._finished_offline = self._finished_offline, []
        if not finished:
            return
        total = len(finished)
        try:
            while finished:
                chunk = finished[:MAX_SCRIPT_BATCH]
                await self._write_back_chunk(chunk)
                del finished[: len(chunk)]
        except REDIS_UNAVAILABLE:
            self._finished_offline = finished + self._finished_offline
            raise
        log.info("done_markers_written_back", count=total)

    async def _write_back_chunk(self, chunk: list[tuple[str, str]]) -> None:
        keys = [self._keys.stats]
        for message_id, _ in chunk:
            keys += (self._keys.done(message_id), self._keys.attempts(message_id))
        args = [str(self._dedup_ttl_s), str(THROUGHPUT_BUCKET_TTL_S), *(kind for _, kind in chunk)]
        args.append(self._keys.throughput_stem)
        await self._write_back_script(keys=keys, args=args)

    async def aclose(self) -> None:
        await self._redis.aclose()
        await self._memory.aclose()
