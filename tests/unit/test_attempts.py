"""Attempts are counted per message ID when it is claimed, in Redis (the Lua script) and in memory."""

from __future__ import annotations

import fakeredis
import pytest

from tests.unit.test_dedup import claim_one, complete_one
from worker.amqp.broker import Topology
from worker.claims.memory_store import MemoryClaimStore
from worker.claims.protocol import ClaimAsk, ClaimStatus, CompleteStatus, TokenSource
from worker.claims.redis_store import RedisClaimStore
from worker.redisio.keys import RedisKeys

KEYS = RedisKeys("unit:")
MAX_ATTEMPTS = 3


@pytest.fixture
def redis() -> fakeredis.FakeAsyncRedis:
    return fakeredis.FakeAsyncRedis()


def redis_store(redis: fakeredis.FakeAsyncRedis, replica: str = "a") -> RedisClaimStore:
    return RedisClaimStore(
        redis,
        KEYS,
        TokenSource(replica),
        lease_s=30,
        dedup_ttl_s=600,
        max_attempts=MAX_ATTEMPTS,
    )


def memory_store() -> MemoryClaimStore:
    return MemoryClaimStore(
        TokenSource("m"), lease_s=30, dedup_ttl_s=600, max_done=100, max_attempts=MAX_ATTEMPTS
    )


async def test_each_claim_counts_an_attempt_and_the_last_one_is_refused(
    redis: fakeredis.FakeAsyncRedis,
) -> None:
    """A claim that is never completed (the replica died, or released after a failure) still
    counts; once MAX_ATTEMPTS were started the next claim answers EXHAUSTED and takes no lease."""
    store = redis_store(redis)
    for expected in range(1, MAX_ATTEMPTS + 1):
        claim = await claim_one(store, "poison", redelivered=expected > 1)
        assert claim.status is ClaimStatus.CLAIMED
        assert claim.attempt == expected
        await redis.delete(KEYS.claim("poison"))  # as if the lease of a killed replica lapsed
    for _ in range(2):
        exhausted = await claim_one(store, "poison", redelivered=True)
        assert exhausted.status is ClaimStatus.EXHAUSTED
        assert exhausted.attempt == MAX_ATTEMPTS
    assert not await redis.exists(KEYS.claim("poison"))
    assert int(await redis.get(KEYS.attempts("poison"))) == MAX_ATTEMPTS
    assert 0 < await redis.ttl(KEYS.attempts("poison")) <= 600


async def test_busy_and_done_answers_count_no_attempt(redis: fakeredis.FakeAsyncRedis) -> None:
    """Waiting on another replica's claim or meeting a done ID is not an attempt; completing
    removes the count, leaving only the done marker."""
    a, b = redis_store(redis, "a"), redis_store(redis, "b")
    claim = await claim_one(a, "m", redelivered=False)
    for _ in range(5):
        assert (await claim_one(b, "m", redelivered=False)).status is ClaimStatus.BUSY
    assert int(await redis.get(KEYS.attempts("m"))) == 1
    assert await complete_one(a, "m", claim.token, cache_hit=False) is CompleteStatus.IN_REDIS
    assert not await redis.exists(KEYS.attempts("m"))
    for _ in range(5):
        assert (await claim_one(b, "m", redelivered=False)).status is ClaimStatus.DONE
    assert not await redis.exists(KEYS.attempts("m"))


async def test_a_batch_answers_each_id_with_its_own_count(redis: fakeredis.FakeAsyncRedis) -> None:
    """One script call over new, retried, exhausted, busy and done IDs gives each its own answer."""
    store = redis_store(redis)
    await redis.set(KEYS.attempts("retried"), 1)
    await redis.set(KEYS.attempts("spent"), MAX_ATTEMPTS)
    await redis.set(KEYS.claim("busy"), "someone-else", px=5_000)
    await redis.set(KEYS.done("done"), "1")
    await redis.set(KEYS.attempts("crashed-twice"), 2)
    results = await store.claim_many(
        [
            ClaimAsk("new", suspect_at=2),
            ClaimAsk("retried", suspect_at=3),
            ClaimAsk("spent", redelivered=True, suspect_at=2),
            ClaimAsk("busy", suspect_at=2),
            ClaimAsk("done", suspect_at=2),
            ClaimAsk("crashed-twice", redelivered=True, suspect_at=2),
        ]
    )
    assert [(r.status, r.attempt) for r in results] == [
        (ClaimStatus.CLAIMED, 1),
        (ClaimStatus.CLAIMED, 2),
        (ClaimStatus.EXHAUSTED, MAX_ATTEMPTS),
        (ClaimStatus.BUSY, 0),
        (ClaimStatus.DONE, 0),
        (ClaimStatus.SUSPECT, 2),
    ]
    assert 0 < results[3].retry_after_s <= 5
    assert not await redis.exists(KEYS.claim("crashed-twice"))
    assert int(await redis.get(KEYS.attempts("crashed-twice"))) == 2


async def test_a_suspect_is_reported_not_claimed_until_asked_without_the_threshold(
    redis: fakeredis.FakeAsyncRedis,
) -> None:
    """With two attempts started and none recorded as ended, a claim with suspect_at=2 answers
    SUSPECT and counts nothing; the claim made to work on it alone (no threshold) counts the third."""
    store = redis_store(redis)
    for _ in range(2):
        claim = await claim_one(store, "x", redelivered=True, suspect_at=2)
        assert claim.status is ClaimStatus.CLAIMED
        await redis.delete(KEYS.claim("x"))  # its replica died
    suspect = await claim_one(store, "x", redelivered=True, suspect_at=2)
    assert (suspect.status, suspect.attempt) == (ClaimStatus.SUSPECT, 2)
    alone = await claim_one(store, "x", redelivered=True)
    assert (alone.status, alone.attempt) == (ClaimStatus.CLAIMED, 3)


async def test_unlimited_store_counts_without_refusing(redis: fakeredis.FakeAsyncRedis) -> None:
    """With max_attempts 0 the count still rises, and no claim is ever refused."""
    store = RedisClaimStore(redis, KEYS, TokenSource("a"), lease_s=30, dedup_ttl_s=600)
    for expected in range(1, 8):
        claim = await claim_one(store, "x", redelivered=False)
        assert (claim.status, claim.attempt) == (ClaimStatus.CLAIMED, expected)
        assert await store.release("x", claim.token)


async def test_memory_store_has_the_same_semantics() -> None:
    """In memory: claims count, busy claims do not, the attempt after the last is refused, a
    suspect is reported past its threshold, and completing forgets the count."""
    store = memory_store()
    for expected in range(1, MAX_ATTEMPTS + 1):
        claim = await claim_one(store, "poison", redelivered=False)
        assert (claim.status, claim.attempt) == (ClaimStatus.CLAIMED, expected)
        assert (await claim_one(store, "poison", redelivered=False)).status is ClaimStatus.BUSY
        assert await store.release("poison", claim.token)
    exhausted = await claim_one(store, "poison", redelivered=True)
    assert (exhausted.status, exhausted.attempt) == (ClaimStatus.EXHAUSTED, MAX_ATTEMPTS)

    claim = await claim_one(store, "suspect", redelivered=True, suspect_at=1)
    assert await store.release("suspect", claim.token)
    assert (await claim_one(store, "suspect", True, suspect_at=1)).status is ClaimStatus.SUSPECT
    assert (await claim_one(store, "suspect", True)).attempt == 2

    claim = await claim_one(store, "fine", redelivered=False)
    assert (
        await complete_one(store, "fine", claim.token, cache_hit=False) is CompleteStatus.IN_MEMORY
    )
    assert (await claim_one(store, "fine", redelivered=False)).status is ClaimStatus.DONE


def test_tokens_of_a_restarted_replica_never_repeat() -> None:
    """Two processes using the same REPLICA_ID issue different tokens for the same sequence."""
    first, second = TokenSource("replica-1"), TokenSource("replica-1")
    assert first.next() != second.next()
    assert first.next().startswith("replica-1:")


def test_retry_delays_double_and_stay_bounded() -> None:
    """Delays double per attempt up to one hour, even for an absurd attempt number."""
    topology = Topology("in", "out", "dead", retry_base_delay_s=0.5, max_attempts=5)
    assert [topology.retry_delay_ms(a) for a in (1, 2, 3, 4)] == [500, 1000, 2000, 4000]
    assert topology.retry_delay_ms(10**9) == 3_600_000
    assert topology.retry_queue(2) == "in.retry.1000ms"
