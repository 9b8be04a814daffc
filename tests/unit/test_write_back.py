"""Completions made while Redis was unreachable are recorded, and counted once, when it returns."""

from __future__ import annotations

from collections.abc import AsyncIterator

import fakeredis
import pytest

from tests.unit.test_dedup import complete_one
from worker.claims.fallback import FallbackClaimStore
from worker.claims.memory_store import MemoryClaimStore
from worker.claims.protocol import ClaimAsk, CompleteStatus, Completion, TokenSource
from worker.claims.redis_store import RedisClaimStore
from worker.observability.counters import Counters
from worker.observability.metrics import CounterName
from worker.observability.stats import read_counters
from worker.redisio.keys import RedisKeys
from worker.redisio.link import LinkState, RedisLink

KEYS = RedisKeys("wb:")


@pytest.fixture
async def link() -> AsyncIterator[RedisLink]:
    """A connected link to a fresh fake Redis."""
    made = RedisLink(fakeredis.FakeAsyncRedis(), "redis://fake:6379/0")
    assert await made.connect()
    yield made
    await made.aclose()


def store(link: RedisLink) -> FallbackClaimStore:
    memory = MemoryClaimStore(TokenSource("r/memory"), lease_s=30, dedup_ttl_s=600, max_done=100)
    redis = RedisClaimStore(link.client, KEYS, TokenSource("r"), lease_s=30, dedup_ttl_s=600)
    return FallbackClaimStore(
        redis,
        memory,
        link=link,
        keys=KEYS,
        counters=Counters(cluster=True),
        memory_token_prefix="r/memory",
        dedup_ttl_s=600,
    )


async def stats(link: RedisLink) -> dict[str, int]:
    return {name: n for name, n in (await read_counters(link.client, KEYS)).items() if n}


async def test_a_completion_whose_answer_was_lost_is_not_counted_twice(link: RedisLink) -> None:
    """The completion script ran (marker set, message counted) but its answer never came back:
    the replica finishes in memory, and the write-back finds the marker and counts nothing."""
    claims = store(link)
    claim = (await claims.claim_many([ClaimAsk("m-1")]))[0]
    redis_only = RedisClaimStore(link.client, KEYS, TokenSource("x"), lease_s=30, dedup_ttl_s=600)
    assert await complete_one(redis_only, "m-1", claim.token, True) is CompleteStatus.IN_REDIS
    link.state = LinkState.DISCONNECTED  # the answer was lost: Redis looks away
    assert await complete_one(claims, "m-1", claim.token, True) is CompleteStatus.DEFERRED
    link.state = LinkState.CONNECTED
    await claims.write_back()
    assert (await stats(link)).get(CounterName.PROCESSED) == 1
    assert (await stats(link)).get(CounterName.CACHE_HITS) == 1


async def test_completions_made_offline_are_marked_done_and_counted_on_return(
    link: RedisLink,
) -> None:
    """Claims taken in Redis and finished while it was away: the write-back sets their done
    markers, clears their attempt counters and counts them (hits and misses apart)."""
    claims = store(link)
    taken = await claims.claim_many([ClaimAsk("a"), ClaimAsk("b"), ClaimAsk("c")])
    assert await link.client.exists(*(KEYS.attempts(m) for m in "abc")) == 3
    link.state = LinkState.DISCONNECTED
    statuses = await claims.complete_many(
        [
            Completion(m, c.token, hit)
            for m, c, hit in zip("abc", taken, (True, False, False), strict=True)
        ]
    )
    assert statuses == [CompleteStatus.DEFERRED] * 3
    assert await stats(link) == {}
    link.state = LinkState.CONNECTED
    await claims.write_back()
    counted = await stats(link)
    assert (counted[CounterName.PROCESSED], counted[CounterName.CACHE_HITS]) == (3, 1)
    assert counted[CounterName.CACHE_MISSES] == 2
    for message_id in "abc":
        assert await link.client.get(KEYS.done(message_id)) == b"1"
        assert await link.client.exists(KEYS.attempts(message_id)) == 0
    await claims.write_back()  # nothing left: counted once
    assert (await stats(link))[CounterName.PROCESSED] == 3
