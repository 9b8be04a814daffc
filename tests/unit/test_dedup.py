"""The claim scripts, run by fakeredis's Lua engine, and the in-memory claim store."""

from __future__ import annotations

import asyncio
import re

import fakeredis
import pytest

from worker.claims.memory_store import MemoryClaimStore
from worker.claims.protocol import (
    ClaimAsk,
    ClaimResult,
    ClaimStatus,
    ClaimStore,
    CompleteStatus,
    Completion,
    Lease,
    TokenSource,
)
from worker.claims.redis_store import CLAIM, COMPLETE, WRITE_BACK, RedisClaimStore
from worker.observability.metrics import CounterName
from worker.observability.stats import read_counters
from worker.redisio.keys import RedisKeys

KEYS = RedisKeys("unit:")


async def claim_one(
    store: ClaimStore, message_id: str, redelivered: bool = False, suspect_at: int = 0
) -> ClaimResult:
    """``claim_many`` for one ID (tests that follow a single message)."""
    return (await store.claim_many([ClaimAsk(message_id, redelivered, suspect_at)]))[0]


async def complete_one(
    store: ClaimStore, message_id: str, token: str, cache_hit: bool = False
) -> CompleteStatus:
    """``complete_many`` for one claim."""
    return (await store.complete_many([Completion(message_id, token, cache_hit)]))[0]


@pytest.fixture
def redis() -> fakeredis.FakeAsyncRedis:
    return fakeredis.FakeAsyncRedis()


def redis_store(
    redis: fakeredis.FakeAsyncRedis, replica: str, lease_s: float = 30
) -> RedisClaimStore:
    return RedisClaimStore(redis, KEYS, TokenSource(replica), lease_s=lease_s, dedup_ttl_s=600)


async def counters(redis: fakeredis.FakeAsyncRedis) -> dict[str, int]:
    """The cluster counters that are not zero (summed over their shards)."""
    return {name: n for name, n in (await read_counters(redis, KEYS)).items() if n}


async def test_claim_complete_then_duplicate(redis: fakeredis.FakeAsyncRedis) -> None:
    """A completed ID answers DONE to later claims; the script counts processed and duplicates."""
    store = redis_store(redis, "a")
    claim = await claim_one(store, "m1")
    assert claim.status is ClaimStatus.CLAIMED
    assert await complete_one(store, "m1", claim.token, cache_hit=True) is CompleteStatus.IN_REDIS
    assert (await claim_one(store, "m1")).status is ClaimStatus.DONE
    assert (await claim_one(store, "m1", redelivered=True)).status is ClaimStatus.DONE
    assert await counters(redis) == {
        CounterName.PROCESSED: 1,
        CounterName.CACHE_HITS: 1,
        CounterName.DUPLICATES: 1,
        CounterName.REDELIVERED_DONE: 1,
    }
    assert 0 < await redis.ttl(KEYS.done("m1")) <= 600
    assert not await redis.exists(KEYS.claim("m1"))


async def test_a_completion_lands_in_this_seconds_throughput_bucket(
    redis: fakeredis.FakeAsyncRedis,
) -> None:
    """The completion script adds its messages to this second's field of one throughput hash
    (the shard of the batch's first message), which expires after the bucket TTL."""
    store = redis_store(redis, "a")
    claims = await store.claim_many([ClaimAsk("t1"), ClaimAsk("t2")])
    await store.complete_many(
        [Completion(f"t{i + 1}", c.token, False) for i, c in enumerate(claims)]
    )
    buckets = [key async for key in redis.scan_iter(match=KEYS.throughput_pattern)]
    assert len(buckets) == 1
    assert sum(int(n) for n in (await redis.hgetall(buckets[0])).values()) == 2  # type: ignore[misc]
    assert 0 < await redis.ttl(buckets[0]) <= 900


async def test_concurrent_claims_of_one_id_have_one_winner(redis: fakeredis.FakeAsyncRedis) -> None:
    """Two replicas claiming the same ID in the same instant: one gets it, the other is told busy."""
    a, b = redis_store(redis, "a"), redis_store(redis, "b")
    first, second = await asyncio.gather(claim_one(a, "m2"), claim_one(b, "m2"))
    assert sorted(r.status.value for r in (first, second)) == ["busy", "claimed"]
    busy = first if first.status is ClaimStatus.BUSY else second
    assert 0 < busy.retry_after_s <= 30


async def test_batched_claims_keep_each_answer_with_its_request(
    redis: fakeredis.FakeAsyncRedis,
) -> None:
    """A batch mixing new, done and busy IDs answers each one correctly."""
    store = redis_store(redis, "a")
    done = await claim_one(store, "done")
    await complete_one(store, "done", done.token)
    await claim_one(store, "busy")
    results = await store.claim_many([ClaimAsk("new"), ClaimAsk("done"), ClaimAsk("busy")])
    assert [r.status for r in results] == [ClaimStatus.CLAIMED, ClaimStatus.DONE, ClaimStatus.BUSY]


async def test_only_the_owner_renews_releases_or_completes(redis: fakeredis.FakeAsyncRedis) -> None:
    """Renew, release and complete with another replica's token change nothing."""
    a, b = redis_store(redis, "a"), redis_store(redis, "b")
    claim = await claim_one(a, "m3")
    forged = "b:1"
    assert await b.renew([Lease("m3", forged)]) == [False]
    assert await b.release("m3", forged) is False
    assert await complete_one(b, "m3", forged) is CompleteStatus.LOST
    assert await redis.get(KEYS.claim("m3")) == claim.token.encode()
    assert await a.release("m3", claim.token) is True
    assert (await claim_one(b, "m3")).status is ClaimStatus.CLAIMED


async def test_memory_store_dedups_within_the_process() -> None:
    """The in-memory store claims, completes, reports duplicates and forgets the oldest past its
    size bound."""
    store = MemoryClaimStore(TokenSource("m"), lease_s=30, dedup_ttl_s=600, max_done=2)
    for message_id in ("a", "b", "c"):
        claim = await claim_one(store, message_id)
        assert claim.status is ClaimStatus.CLAIMED
        assert (await claim_one(store, message_id)).status is ClaimStatus.BUSY
        assert await complete_one(store, message_id, claim.token) is CompleteStatus.IN_MEMORY
    assert (await claim_one(store, "c")).status is ClaimStatus.DONE
    assert (await claim_one(store, "a")).status is ClaimStatus.CLAIMED  # forgotten: bound is 2


def test_the_counters_the_scripts_write_are_metric_names() -> None:
    """Every counter name a claim script spells is a ``CounterName``, so ``stats`` shows it."""
    names = {name.value for name in CounterName}
    for script in (CLAIM, COMPLETE, WRITE_BACK):
        header = re.search(r"^local ([A-Z_, ]+) = (.+)$", script.source, re.MULTILINE)
        assert header is not None, script.name
        spelled = re.findall(r"'(\w+)'", header.group(2))
        assert len(spelled) == len(header.group(1).split(",")), script.name
        assert set(spelled) <= names, script.name
