"""Leases: renewed while work runs; a replica that lost its lease cannot touch the new owner's claim."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests.conftest import Names
from tests.integration.support import (
    Replicas,
    ResultSink,
    body,
    cluster_counters,
    publish_bodies,
    wait_counter,
)
from tests.unit.test_dedup import claim_one, complete_one
from worker.claims.protocol import ClaimStatus, CompleteStatus, Lease, TokenSource
from worker.claims.redis_store import RedisClaimStore
from worker.observability.metrics import CounterName
from worker.redisio.keys import RedisKeys

pytestmark = pytest.mark.integration


def store(client: aioredis.Redis, names: Names, replica: str, lease_s: float) -> RedisClaimStore:
    return RedisClaimStore(
        client, RedisKeys(names.key_prefix), TokenSource(replica), lease_s=lease_s, dedup_ttl_s=60
    )


async def test_lost_lease_cannot_complete_release_or_renew_the_new_owners_claim(
    names: Names, redis_client: aioredis.Redis
) -> None:
    """After A's lease expires and B claims the ID, A's complete, release and renew all fail and
    leave B's claim untouched; B then completes normally."""
    a = store(redis_client, names, "replica-a", lease_s=0.2)
    b = store(redis_client, names, "replica-b", lease_s=30)
    first = await claim_one(a, "x")
    assert first.status is ClaimStatus.CLAIMED
    assert (await claim_one(b, "x")).status is ClaimStatus.BUSY
    await asyncio.sleep(0.35)
    second = await claim_one(b, "x")
    assert second.status is ClaimStatus.CLAIMED

    assert await complete_one(a, "x", first.token, cache_hit=False) is CompleteStatus.LOST
    assert await a.release("x", first.token) is False
    assert await a.renew([Lease("x", first.token)]) == [False]
    keys = RedisKeys(names.key_prefix)
    assert await redis_client.get(keys.claim("x")) == second.token.encode()
    assert not await redis_client.exists(keys.done("x"))

    assert await complete_one(b, "x", second.token, cache_hit=False) is CompleteStatus.IN_REDIS
    assert (await claim_one(a, "x")).status is ClaimStatus.DONE
    counters = await cluster_counters(redis_client, names)
    assert counters[CounterName.PROCESSED] == 1
    assert counters[CounterName.DUPLICATES] == 1
    await a.aclose()
    await b.aclose()


async def test_renewal_keeps_a_claim_for_work_longer_than_the_lease(
    names: Names, redis_client: aioredis.Redis
) -> None:
    """Renewing before expiry keeps the claim for as long as the work takes."""
    a = store(redis_client, names, "replica-a", lease_s=0.3)
    claim = await claim_one(a, "y")
    for _ in range(6):
        await asyncio.sleep(0.15)
        assert await a.renew([Lease("y", claim.token)]) == [True]
    assert (await claim_one(a, "y")).status is ClaimStatus.BUSY
    assert await complete_one(a, "y", claim.token, cache_hit=True) is CompleteStatus.IN_REDIS
    await a.aclose()


async def test_replica_work_outliving_the_lease_keeps_its_claim(
    names: Names, redis_client: aioredis.Redis, amqp: object, tmp_path: Path
) -> None:
    """A replica whose classification takes 2.5 lease lengths keeps the claim by renewal: a copy of
    the same message at another replica waits instead of taking over, and counts as a duplicate."""
    replicas = Replicas(tmp_path)
    try:
        async with ResultSink(names) as sink:
            slow = replicas.start(
                names.env(CLAIM_LEASE_S="1", CLASSIFIER_DELAY_MS="2500", PREFETCH="1")
            )
            await slow.started()
            await publish_bodies(names, [body("long-1", "Почему так долго?")])
            key = RedisKeys(names.key_prefix).claim("long-1")
            while not await redis_client.exists(key):
                await asyncio.sleep(0.02)
            other = replicas.start(names.env(CLAIM_LEASE_S="1"))
            await other.started()
            await asyncio.sleep(1.2)  # past the first lease: only renewal keeps it
            assert await redis_client.exists(key)
            await publish_bodies(names, [body("long-1", "Почему так долго?")])
            await sink.wait_for_ids({"long-1"}, timeout_s=20)
            counters = await wait_counter(redis_client, names, CounterName.DUPLICATES, 1)
            await sink.settle(quiet_s=1.0)
            assert len(sink.by_id["long-1"]) == 1
            assert counters[CounterName.PROCESSED] == 1
            assert counters[CounterName.DUPLICATES] == 1
            assert counters[CounterName.CLAIMS_LOST] == 0
    finally:
        replicas.close()
