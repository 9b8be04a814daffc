"""The claim scripts, run by fakeredis's Lua engine, and the in-memory claim store."""

from __future__ import annotations

import asyncio

import fakeredis
import pytest

from worker.claims.store import (
    ClaimStatus,
    CompleteStatus,
    Lease,
    MemoryClaimStore,
    RedisClaimStore,
    TokenSource,
)
from worker.observability.metrics import CounterName
from worker.redisio.keys import RedisKeys

KEYS = RedisKeys("unit:")


@pytest.fixture
def redis() -> fakeredis.FakeAsyncRedis:
    return fakeredis.FakeAsyncRedis()


def redis_store(
    redis: fakeredis.FakeAsyncRedis, replica: str, lease_s: float = 30
) -> RedisClaimStore:
    return RedisClaimStore(redis, KEYS, TokenSource(replica), lease_s=lease_s, dedup_ttl_s=600)


async def counters(redis: fakeredis.FakeAsyncRedis) -> dict[str, int]:
    raw = await redis.hgetall(KEYS.stats)
    return {k.decode(): int(v) for k, v in raw.items()}


async def test_claim_complete_then_duplicate(redis: fakeredis.FakeAsyncRedis) -> None:
    """A completed ID answers DONE to later claims; the script counts processed and duplicates."""
    store = redis_store(redis, "a")
    claim = await store.claim("m1", redelivered=False)
    assert claim.status is ClaimStatus.CLAIMED
    assert await store.complete("m1", claim.token, cache_hit=True) is CompleteStatus.IN_REDIS
    assert (await store.claim("m1", redelivered=False)).status is ClaimStatus.DONE
    assert (await store.claim("m1", redelivered=True)).status is ClaimStatus.DONE
    assert await counters(redis) == {
        CounterName.PROCESSED: 1,
        CounterName.CACHE_HITS: 1,
        CounterName.DUPLICATES: 1,
        CounterName.REDELIVERED_DONE: 1,
    }
    assert 0 < await redis.ttl(KEYS.done("m1")) <= 600
    assert not await redis.exists(KEYS.claim("m1"))


async def test_concurrent_claims_of_one_id_have_one_winner(redis: fakeredis.FakeAsyncRedis) -> None:
    """Two replicas claiming the same ID in the same instant: one gets it, the other is told busy."""
    a, b = redis_store(redis, "a"), redis_store(redis, "b")
    first, second = await asyncio.gather(a.claim("m2", False), b.claim("m2", False))
    assert sorted(r.status.value for r in (first, second)) == ["busy", "claimed"]
    busy = first if first.status is ClaimStatus.BUSY else second
    assert 0 < busy.retry_after_s <= 30


async def test_batched_claims_keep_each_answer_with_its_request(
    redis: fakeredis.FakeAsyncRedis,
) -> None:
    """A batch mixing new, done and busy IDs answers each one correctly."""
    store = redis_store(redis, "a")
    done = await store.claim("done", False)
    await store.complete("done", done.token, cache_hit=False)
    await store.claim("busy", False)
    results = await asyncio.gather(
        store.claim("new", False), store.claim("done", False), store.claim("busy", False)
    )
    assert [r.status for r in results] == [ClaimStatus.CLAIMED, ClaimStatus.DONE, ClaimStatus.BUSY]


async def test_only_the_owner_renews_releases_or_completes(redis: fakeredis.FakeAsyncRedis) -> None:
    """Renew, release and complete with another replica's token change nothing."""
    a, b = redis_store(redis, "a"), redis_store(redis, "b")
    claim = await a.claim("m3", False)
    forged = "b:1"
    assert await b.renew([Lease("m3", forged)]) == [False]
    assert await b.release("m3", forged) is False
    assert await b.complete("m3", forged, cache_hit=False) is CompleteStatus.LOST
    assert await redis.get(KEYS.claim("m3")) == claim.token.encode()
    assert await a.release("m3", claim.token) is True
    assert (await b.claim("m3", False)).status is ClaimStatus.CLAIMED


async def test_memory_store_dedups_within_the_process() -> None:
    """The in-memory store claims, completes, reports duplicates and forgets the oldest past its
    size bound."""
    store = MemoryClaimStore(TokenSource("m"), lease_s=30, dedup_ttl_s=600, max_done=2)
    for message_id in ("a", "b", "c"):
        claim = await store.claim(message_id, False)
        assert claim.status is ClaimStatus.CLAIMED
        assert (await store.claim(message_id, False)).status is ClaimStatus.BUSY
        assert await store.complete(message_id, claim.token, False) is CompleteStatus.IN_MEMORY
    assert (await store.claim("c", False)).status is ClaimStatus.DONE
    assert (await store.claim("a", False)).status is ClaimStatus.CLAIMED  # forgotten: bound is 2
