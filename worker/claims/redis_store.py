"""Claims in Redis, shared by every replica using the same key prefix (protocol: ``protocol``).

Each batch operation is one script call per shard of the batch on a Redis Cluster (all of a
message's keys and its shard's counters share a hash tag, see ``keys``), the calls of a batch
running at once; on a single Redis, one script call for the whole batch. Renewal is the Redis
layer's shared ``renew.lua``. Every key a script touches is in its KEYS.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple, Protocol

import structlog
from redis.exceptions import NoScriptError

from worker.claims.protocol import ClaimResult, ClaimStatus, CompleteStatus, Lease
from worker.redisio.batching import MicroBatcher, in_groups
from worker.redisio.clients import RedisClient, is_cluster
from worker.redisio.faults import ReplicasBehind
from worker.redisio.keys import THROUGHPUT_BUCKET_TTL_S, RedisKeys, shard_of
from worker.redisio.scripts import RENEW, LuaScript

if TYPE_CHECKING:
    from worker.claims.protocol import ClaimAsk, Completion, TokenSource

log = structlog.get_logger("worker.claims")

CLAIM = LuaScript("worker.claims", "claim.lua")
COMPLETE = LuaScript("worker.claims", "complete.lua", library=("count_completed.lua",))
RELEASE = LuaScript("worker.claims", "release.lua")
WRITE_BACK = LuaScript("worker.claims", "write_back.lua", library=("count_completed.lua",))
REFUND = LuaScript("worker.claims", "refund.lua")


class ClaimRequest(NamedTuple):
    """A ``ClaimAsk`` with the token the lease will hold if it is taken."""

    message_id: str
    token: str
    redelivered: bool
    suspect_at: int = 0


class WriteBack(NamedTuple):
    """A message finished while Redis was away, and what its write-back counts: '0' nothing
    (claimed in memory, counted there), '1' a cache miss, '2' a cache hit."""

    message_id: str
    kind: str


class _HasMessageId(Protocol):
    @property
    def message_id(self) -> str: ...


def _shard(item: _HasMessageId) -> int:
    return shard_of(item.message_id)


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
        redis: RedisClient,
        keys: RedisKeys,
        tokens: TokenSource,
        *,
        lease_s: float,
        dedup_ttl_s: int,
        max_attempts: int = 0,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 1000,
    ) -> None:
        self.lease_s = lease_s
        self._redis = redis
        self._wait = (str(wait_replicas), str(wait_timeout_ms)) if wait_replicas else None
        self._keys = keys
        self._tokens = tokens
        self._lease_ms = str(max(1, int(lease_s * 1000)))
        self._dedup_ttl_s = str(dedup_ttl_s)
        self._bucket_ttl_s = str(THROUGHPUT_BUCKET_TTL_S)
        self._max_attempts = str(max_attempts)  # 0: count attempts, never refuse one
        self._split = is_cluster(redis)  # a cluster wants each call's keys in one slot
        self._claim_script = CLAIM.register(redis)
        self._complete_script = COMPLETE.register(redis)
        self._renew_script = RENEW.register(redis)
        self._release_script = RELEASE.register(redis)
        self._write_back_script = WRITE_BACK.register(redis)
        self._refund_script = REFUND.register(redis)
        # Releases come one message at a time (failures, shutdown): concurrent ones share a call.
        self._releases: MicroBatcher[Lease, bool] = MicroBatcher(self._release_batch)

    async def claim_many(self, requests: Sequence[ClaimAsk]) -> list[ClaimResult]:
        batch = [
            ClaimRequest(ask.message_id, self._tokens.next(), ask.redelivered, ask.suspect_at)
            for ask in requests
        ]
        return await in_groups(self._claim_batch, batch, _shard, split=self._split)

    async def complete_many(self, items: Sequence[Completion]) -> list[CompleteStatus]:
        done = await in_groups(self._complete_batch, items, _shard, split=self._split)
        return [CompleteStatus.IN_REDIS if d else CompleteStatus.LOST for d in done]

    async def release(self, message_id: str, token: str, *, refund_attempt: bool = False) -> bool:
        if refund_attempt:
            keys = [self._keys.claim(message_id), self._keys.attempts(message_id)]
            return bool(await self._refund_script(keys=keys, args=[token]))
        return await self._releases.submit(Lease(message_id, token))

    async def renew(self, leases: Sequence[Lease]) -> list[bool]:
        return await in_groups(self._renew_batch, leases, _shard, split=self._split)

    async def write_back(self, items: Sequence[WriteBack]) -> int:
        """Write the done markers of messages finished while Redis was away, and count those not
        counted yet (see write_back.lua); answers how many were counted now."""
        counted = await in_groups(self._write_back_batch, items, _shard, split=self._split)
        return sum(counted)

    async def _claim_batch(self, shard: int, batch: list[ClaimRequest]) -> list[ClaimResult]:
        keys = [self._keys.stats(shard)]
        args = [self._lease_ms, self._max_attempts, self._dedup_ttl_s]
        for request in batch:
            _, done, claim, attempts = self._keys.message(request.message_id)
            keys += (done, claim, attempts)
            args += (request.token, str(2 * request.suspect_at + (1 if request.redelivered else 0)))
        answers = await self._claim_script(keys=keys, args=args)
        return [
            claim_answer(int(answers[2 * index]), int(answers[2 * index + 1]), request.token)
            for index, request in enumerate(batch)
        ]

    async def _complete_batch(self, shard: int, batch: list[Completion]) -> list[bool]:
        now_s = int(time.time())
        keys = [self._keys.stats(shard), self._keys.throughput(shard, now_s)]
        args = [self._dedup_ttl_s, self._bucket_ttl_s, str(now_s)]
        for item in batch:
            _, done, claim, attempts = self._keys.message(item.message_id)
            keys += (done, claim, attempts)
            args += (item.token, "1" if item.cache_hit else "0")
        if self._wait is not None:
            answers = await self._complete_replicated(keys, args)
        else:
            answers = await self._complete_script(keys=keys, args=args)
        return [bool(x) for x in answers]

    async def _complete_replicated(self, keys: list[str], args: list[str]) -> list[int]:
        """The completion script and ``WAIT`` (``REDIS_WAIT_REPLICAS``) in one round trip on one
        connection: ``WAIT`` counts the replicas that have this connection's writes, so it must
        follow the script on the same one. Too few replicas by the timeout
        raises ``ReplicasBehind``: the batch is held and retried (``fallback``), as after a
        failover its done markers may be on an old master only."""
        assert self._wait is not None
        for _ in range(2):
            pipe = self._redis.pipeline(transaction=False)
            pipe.evalsha(self._complete_script.sha, len(keys), *keys, *args)
            pipe.execute_command("WAIT", *self._wait)
            answers, replicas = await pipe.execute(raise_on_error=False)
            if isinstance(answers, NoScriptError):  # a restart or a failover: load, go again
                await self._redis.script_load(self._complete_script.script)
                continue
            if isinstance(answers, BaseException):
                raise answers
            if isinstance(replicas, BaseException):
                raise replicas
            if int(replicas) < int(self._wait[0]):
                raise ReplicasBehind(f"WAIT: {replicas} of {self._wait[0]} replicas in time")
            return list(answers)
        raise NoScriptError("the completion script could not be loaded")

    async def _renew_batch(self, _shard: int, batch: list[Lease]) -> list[bool]:
        keys = [self._keys.claim(lease.message_id) for lease in batch]
        args = [self._lease_ms, *(lease.token for lease in batch)]
        return [bool(x) for x in await self._renew_script(keys=keys, args=args)]

    async def _release_batch(self, batch: list[Lease]) -> list[bool]:
        return await in_groups(self._release_part, batch, _shard, split=self._split)

    async def _release_part(self, _shard: int, batch: list[Lease]) -> list[bool]:
        keys = [self._keys.claim(lease.message_id) for lease in batch]
        args = [lease.token for lease in batch]
        return [bool(x) for x in await self._release_script(keys=keys, args=args)]

    async def _write_back_batch(self, shard: int, batch: list[WriteBack]) -> list[int]:
        now_s = int(time.time())
        keys = [self._keys.stats(shard), self._keys.throughput(shard, now_s)]
        for item in batch:
            message = self._keys.message(item.message_id)
            keys += (message.done, message.attempts)
        args = [self._dedup_ttl_s, self._bucket_ttl_s, str(now_s), *(i.kind for i in batch)]
        return [int(x) for x in await self._write_back_script(keys=keys, args=args)]

    async def aclose(self) -> None:
        await self._releases.aclose()
