"""Claims in Redis, shared by every replica using the same key prefix (protocol: ``protocol``).

Each batch operation is one script call (``scripts/*.lua``; renewal is the Redis layer's shared
``renew.lua``). The claim and completion scripts get the key stems once and then only the message
IDs, and build each ID's keys in Lua: a call carries an ID per message instead of three full keys,
and the arguments were most of the client's and the server's work per message. (Redis Cluster
wants keys declared in KEYS; the worker's deployments are a single Redis, as for the throughput
buckets.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

from redis.asyncio import Redis

from worker.claims.protocol import ClaimResult, ClaimStatus, CompleteStatus, Lease
from worker.redisio.batching import MicroBatcher, in_script_batches
from worker.redisio.keys import THROUGHPUT_BUCKET_TTL_S, RedisKeys
from worker.redisio.scripts import RENEW, LuaScript

if TYPE_CHECKING:
    from worker.claims.protocol import ClaimAsk, Completion, TokenSource

CLAIM = LuaScript("worker.claims", "claim.lua")
COMPLETE = LuaScript("worker.claims", "complete.lua", library=("count_completed.lua",))
RELEASE = LuaScript("worker.claims", "release.lua")
REFUND = LuaScript("worker.claims", "refund.lua")


class ClaimRequest(NamedTuple):
    """A ``ClaimAsk`` with the token the lease will hold if it is taken."""

    message_id: str
    token: str
    redelivered: bool
    suspect_at: int = 0


def claim_answer(status: int, value: int, token: str) -> ClaimResult:
    """The ``ClaimResult`` of one ``(status, value)`` pair of claim.lua's answer."""
    if status == 0:
        return ClaimResult(ClaimStatus.CLAIMED, token, in_redis=True, attempt=value)
    if status == 1:
        return ClaimResult(ClaimStatus.DONE, in_redis=True)
    if status == 2:
        return ClaimResult(ClaimStatus.BUSY, retry_after_s=value / 1000)
    if status == 3:
        return ClaimResult(ClaimStatus.EXHAUSTED, attempt=value)
    return ClaimResult(ClaimStatus.SUSPECT, attempt=value)


class RedisClaimStore:
    """Claims in Redis, shared by every replica using the same key prefix."""

    def __init__(
        self,
        redis: Redis,
        keys: RedisKeys,
        tokens: TokenSource,
        *,
        lease_s: float,
        dedup_ttl_s: int,
        max_attempts: int = 0,
    ) -> None:
        self.lease_s = lease_s
        self._keys = keys
        self._tokens = tokens
        self._lease_ms = str(max(1, int(lease_s * 1000)))
        self._dedup_ttl_s = str(dedup_ttl_s)
        self._bucket_ttl_s = str(THROUGHPUT_BUCKET_TTL_S)
        self._max_attempts = str(max_attempts)  # 0: count attempts, never refuse one
        self._stems = (keys.done_stem, keys.claim_stem, keys.attempts_stem)
        self._claim_script = CLAIM.register(redis)
        self._complete_script = COMPLETE.register(redis)
        self._renew_script = RENEW.register(redis)
        self._release_script = RELEASE.register(redis)
        self._refund_script = REFUND.register(redis)
        # Releases come one message at a time (failures, shutdown): concurrent ones share a call.
        self._releases: MicroBatcher[Lease, bool] = MicroBatcher(self._release_batch)

    async def claim_many(self, requests: Sequence[ClaimAsk]) -> list[ClaimResult]:
        batch = [
            ClaimRequest(ask.message_id, self._tokens.next(), ask.redelivered, ask.suspect_at)
            for ask in requests
        ]
        return await in_script_batches(self._claim_batch, batch)

    async def complete_many(self, items: Sequence[Completion]) -> list[CompleteStatus]:
        done = await in_script_batches(self._complete_batch, items)
        return [CompleteStatus.IN_REDIS if d else CompleteStatus.LOST for d in done]

    async def release(self, message_id: str, token: str, *, refund_attempt: bool = False) -> bool:
        if refund_attempt:
            keys = [self._keys.claim(message_id), self._keys.attempts(message_id)]
            return bool(await self._refund_script(keys=keys, args=[token]))
        return await self._releases.submit(Lease(message_id, token))

    async def renew(self, leases: Sequence[Lease]) -> list[bool]:
        if not leases:
            return []
        keys = [self._keys.claim(lease.message_id) for lease in leases]
        args = [self._lease_ms, *(lease.token for lease in leases)]
        return [bool(x) for x in await self._renew_script(keys=keys, args=args)]

    async def _claim_batch(self, batch: list[ClaimRequest]) -> list[ClaimResult]:
        args = [self._lease_ms, self._max_attempts, self._dedup_ttl_s, *self._stems]
        for request in batch:
            flags = 2 * request.suspect_at + (1 if request.redelivered else 0)
            args += (request.message_id, request.token, str(flags))
        answers = await self._claim_script(keys=[self._keys.stats], args=args)
        return [
            claim_answer(int(answers[2 * index]), int(answers[2 * index + 1]), request.token)
            for index, request in enumerate(batch)
        ]

    async def _complete_batch(self, batch: list[Completion]) -> list[bool]:
        args = [self._dedup_ttl_s, self._bucket_ttl_s, *self._stems]
        for item in batch:
            args += (item.message_id, item.token, "1" if item.cache_hit else "0")
        args.append(self._keys.throughput_stem)
        answers = await self._complete_script(keys=[self._keys.stats], args=args)
        return [bool(x) for x in answers]

    async def _release_batch(self, batch: list[Lease]) -> list[bool]:
        keys = [self._keys.claim(lease.message_id) for lease in batch]
        args = [lease.token for lease in batch]
        return [bool(x) for x in await self._release_script(keys=keys, args=args)]

    async def aclose(self) -> None:
        await self._releases.aclose()
