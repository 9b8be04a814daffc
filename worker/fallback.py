"""Claims that survive a Redis outage: Redis while it answers, this process's memory meanwhile.

While a configured Redis is unreachable, claims and done markers live in memory (exact within this
replica, blind to the others), every such message is counted as ``degraded``, and the counts its
completion would have added to Redis wait in the pending deltas. IDs finished during the outage are
written back as done markers when Redis returns, so their duplicates are still recognised.
"""

from __future__ import annotations

from collections.abc import Sequence

import structlog

from worker.counters import Counters
from worker.dedup import (
    ClaimResult,
    ClaimStatus,
    CompleteStatus,
    Lease,
    MemoryClaimStore,
    RedisClaimStore,
)
from worker.keys import Counter, RedisKeys
from worker.redis_link import REDIS_UNAVAILABLE, RedisLink

log = structlog.get_logger("worker.claims")


class FallbackClaimStore:
    """A ``ClaimStore`` that routes each call to Redis or to memory by the link's state."""

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
    ) -> None:
        self.lease_s = redis_store.lease_s
        self._redis = redis_store
        self._memory = memory_store
        self._link = link
        self._keys = keys
        self._counters = counters
        self._memory_prefix = memory_token_prefix
        self._dedup_ttl_s = dedup_ttl_s
        self._finished_offline: list[str] = []
        link.on_recovery(self.write_back)

    def _in_memory(self, token: str) -> bool:
        return token.startswith(self._memory_prefix)

    async def claim(self, message_id: str, redelivered: bool) -> ClaimResult:
        if self._memory.is_done(message_id):
            return ClaimResult(ClaimStatus.DONE)
        if self._link.available:
            try:
                return await self._redis.claim(message_id, redelivered)
            except REDIS_UNAVAILABLE as exc:
                self._link.report_failure(exc)
        self._counters.record(Counter.DEGRADED)
        return await self._memory.claim(message_id, redelivered)

    async def claim_many(self, requests: Sequence[tuple[str, bool]]) -> list[ClaimResult]:
        if any(self._memory.is_done(m) for m, _ in requests) or not self._link.available:
            return [await self.claim(m, r) for m, r in requests]
        try:
            return await self._redis.claim_many(requests)
        except REDIS_UNAVAILABLE as exc:
            self._link.report_failure(exc)
        return [await self.claim(m, r) for m, r in requests]

    async def complete(self, message_id: str, token: str, cache_hit: bool) -> CompleteStatus:
        if not self._in_memory(token):
            try:
                return await self._redis.complete(message_id, token, cache_hit)
            except REDIS_UNAVAILABLE as exc:
                self._link.report_failure(exc)
            # The lease was ours when Redis went away; finish here and tell Redis later.
            self._memory.mark_done(message_id)
        elif await self._memory.complete(message_id, token, cache_hit) is CompleteStatus.LOST:
            return CompleteStatus.LOST
        self._finished_offline.append(message_id)
        return CompleteStatus.IN_MEMORY

    async def release(self, message_id: str, token: str) -> bool:
        if self._in_memory(token):
            return await self._memory.release(message_id, token)
        try:
            return await self._redis.release(message_id, token)
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
        """Record in Redis the IDs finished while it was unreachable."""
        finished, self._finished_offline = self._finished_offline, []
        if not finished:
            return
        try:
            pipe = self._link.client.pipeline(transaction=False)
            for message_id in finished:
                pipe.set(self._keys.done(message_id), "1", ex=self._dedup_ttl_s)
            await pipe.execute()
        except REDIS_UNAVAILABLE:
            self._finished_offline = finished + self._finished_offline
            raise
        log.info("done_markers_written_back", count=len(finished))

    async def aclose(self) -> None:
        await self._redis.aclose()
        await self._memory.aclose()
