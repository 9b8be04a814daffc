"""Single flight across replicas: the lock scripts and the wait/take-over protocol, on fakeredis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import fakeredis
import pytest

from worker.redis_link import RedisLink, make_redis
from worker.singleflight import ClusterFlight, ClusterLocks, LockState


@pytest.fixture
async def links() -> AsyncIterator[list[RedisLink]]:
    """Three replicas' links to one (fake) Redis server."""
    server = fakeredis.FakeServer()
    made = [
        RedisLink(fakeredis.FakeAsyncRedis(server=server), "redis://fake:6379/0") for _ in range(3)
    ]
    for link in made:
        assert await link.connect()
    yield made
    for link in made:
        await link.aclose()


class SharedValue:
    """A value in the shared Redis, and a computation of it that counts its calls."""

    def __init__(self, link: RedisLink, key: str = "unit:value", delay_s: float = 0.1) -> None:
        self.link = link
        self.key = key
        self.delay_s = delay_s
        self.computed = 0
        self.fail = False

    async def read(self) -> str | None:
        raw = await self.link.client.get(self.key)
        return raw.decode() if raw is not None else None

    async def compute(self) -> str:
        self.computed += 1
        await asyncio.sleep(self.delay_s)
        if self.fail:
            raise RuntimeError("classifier failed")
        await self.link.client.set(self.key, "answer")
        return "answer"


async def test_lock_is_exclusive_and_released_only_by_its_owner(links: list[RedisLink]) -> None:
    """One replica takes a lock; others see it held; a wrong token cannot release it."""
    a, b = ClusterLocks(links[0]), ClusterLocks(links[1])
    try:
        state, token = await a.acquire("unit:lock:x")
        assert state is LockState.ACQUIRED
        assert (await b.acquire("unit:lock:x"))[0] is LockState.HELD
        await b.release("unit:lock:x", "not-the-owner")
        assert (await b.acquire("unit:lock:x"))[0] is LockState.HELD
        await a.release("unit:lock:x", token)
        assert (await b.acquire("unit:lock:x"))[0] is LockState.ACQUIRED
    finally:
        await a.aclose()
        await b.aclose()


async def test_owner_renews_its_lock_and_a_dead_owner_lets_it_lapse(
    links: list[RedisLink],
) -> None:
    """A held lock outlives its TTL while its owner runs, and lapses soon after the owner stops."""
    a, b = ClusterLocks(links[0], ttl_s=0.3), ClusterLocks(links[1], ttl_s=0.3)
    try:
        assert (await a.acquire("unit:lock:y"))[0] is LockState.ACQUIRED
        await asyncio.sleep(0.8)
        assert (await b.acquire("unit:lock:y"))[0] is LockState.HELD
        await a.aclose()  # the owner "dies": renewals stop, the lock is not released
        assert await b.wait_released("unit:lock:y", 1.0) is True
    finally:
        await a.aclose()
        await b.aclose()


async def test_concurrent_misses_on_three_replicas_compute_once(links: list[RedisLink]) -> None:
    """Misses of one key on three replicas at the same moment run one computation; the others
    wait for it and read its value."""
    value = SharedValue(links[0])
    flights = [ClusterFlight(ClusterLocks(link), wait_s=5) for link in links]
    try:
        results = await asyncio.gather(
            *(f.run("unit:lock:v", value.read, value.compute) for f in flights for _ in range(3))
        )
        assert value.computed == 1
        assert sorted(computed for _, computed in results) == [False] * 8 + [True]
        assert all(answer == "answer" for answer, _ in results)
        assert sum(f.snapshot()["single_flight_cluster_waits"] for f in flights) >= 2
    finally:
        for flight in flights:
            await flight.aclose()


async def test_a_waiter_takes_over_when_the_owner_fails(links: list[RedisLink]) -> None:
    """When the owner's computation fails (nothing stored, lock released), a waiter computes."""
    value = SharedValue(links[0])
    owner, waiter = (ClusterFlight(ClusterLocks(link), wait_s=5) for link in links[:2])
    try:
        value.fail = True
        owner_task = asyncio.get_running_loop().create_task(
            owner.run("unit:lock:f", value.read, value.compute)
        )
        await asyncio.sleep(0.03)

        async def compute_after_failure() -> str:
            value.fail = False
            return await value.compute()

        waiter_task = asyncio.get_running_loop().create_task(
            waiter.run("unit:lock:f", value.read, compute_after_failure)
        )
        with pytest.raises(RuntimeError):
            await owner_task
        assert await waiter_task == ("answer", True)
        assert waiter.snapshot()["single_flight_takeovers"] == 1
        assert value.computed == 2
    finally:
        await owner.aclose()
        await waiter.aclose()


async def test_the_wait_is_bounded(links: list[RedisLink]) -> None:
    """A waiter whose owner neither finishes nor dies computes itself after SINGLE_FLIGHT_WAIT_S."""
    stuck = ClusterLocks(links[0])
    waiter = ClusterFlight(ClusterLocks(links[1]), wait_s=0.3)
    value = SharedValue(links[1], delay_s=0)
    try:
        assert (await stuck.acquire("unit:lock:s"))[0] is LockState.ACQUIRED
        started = asyncio.get_running_loop().time()
        assert await waiter.run("unit:lock:s", value.read, value.compute) == ("answer", True)
        assert 0.3 <= asyncio.get_running_loop().time() - started < 0.6
        assert waiter.snapshot()["single_flight_wait_timeouts"] == 1
    finally:
        await stuck.aclose()
        await waiter.aclose()


async def test_without_a_reachable_redis_it_computes_directly() -> None:
    """With Redis down there is no cluster lock: the replica computes at once."""
    link = RedisLink(make_redis("redis://127.0.0.1:1/0", 0.2), "redis://127.0.0.1:1/0")
    assert not await link.connect()
    flight = ClusterFlight(ClusterLocks(link), wait_s=5)
    computed = 0

    async def compute() -> str:
        nonlocal computed
        computed += 1
        return "answer"

    async def read() -> str | None:
        return None

    try:
        assert await flight.run("unit:lock:d", read, compute) == ("answer", True)
        assert computed == 1
    finally:
        await flight.aclose()
        await link.aclose()
