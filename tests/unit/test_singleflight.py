"""Single flight across replicas: the lock scripts and the wait/take-over protocol, on fakeredis."""

from __future__ import annotations

import asyncio

import pytest

from worker.classification.locks import ClusterLocks, Entry, LockState, Looked, WaitOutcome
from worker.classification.singleflight import ClusterFlight
from worker.core.errors import ClassifierUnavailable
from worker.redisio.clients import make_redis
from worker.redisio.keys import RedisKeys
from worker.redisio.link import RedisLink

KEYS = RedisKeys("unit:")
ENTRY = Entry(KEYS.cache("c", "h"), KEYS.lock("c", "h"))


class TextStore:
    """Values are plain strings (the ``Store`` the flight writes through)."""

    ttl_s = 60

    def encode(self, value: str) -> bytes:
        return value.encode()

    def decode(self, raw: bytes) -> str | None:
        return raw.decode()


class Computation:
    """A computation that takes ``delay_s``, counts its runs, signals its start and can be told
    to fail."""

    def __init__(self, delay_s: float = 0.1) -> None:
        self.delay_s = delay_s
        self.runs = 0
        self.fail = False
        self.started = asyncio.Event()

    async def __call__(self) -> str:
        self.runs += 1
        self.started.set()
        await asyncio.sleep(self.delay_s)
        if self.fail:
            raise RuntimeError("classifier failed")
        return "answer"


async def run(flight: ClusterFlight, compute: Computation) -> tuple[str, bool]:
    """``run_many`` for ``ENTRY`` alone: ``(value, computed_here)``, or its exception raised."""

    async def compute_many(owned: list[int]) -> list[str | Exception]:
        try:
            return [await compute()]
        except Exception as exc:
            return [exc]

    async def compute_alone(index: int) -> str:
        return await compute()

    answer = (await flight.run_many([ENTRY], compute_many, compute_alone, TextStore()))[0]
    if isinstance(answer, Exception):
        raise answer
    return answer


async def look(locks: ClusterLocks) -> Looked:
    """``lookup_or_lock_many`` for ``ENTRY`` alone."""
    return (await locks.lookup_or_lock_many([ENTRY]))[0]


async def waiting(flight: ClusterFlight) -> None:
    """Return once ``flight`` waits for another owner."""
    while not flight.snapshot()["single_flight_cluster_waits"]:
        await asyncio.sleep(0.005)


async def test_lookup_or_lock_returns_the_value_or_one_lock(links: list[RedisLink]) -> None:
    """One script call gives the cached value, or the lock to one caller and "held" to the rest;
    storing the value and releasing the lock happen together, and only the owner can release."""
    a, b = ClusterLocks(links[0]), ClusterLocks(links[1])
    try:
        state, token, _ = await look(a)
        assert state is LockState.ACQUIRED
        assert (await look(b))[0] is LockState.HELD
        await b.store_and_release(ENTRY, "not-the-owner", None, 60)
        assert (await look(b))[0] is LockState.HELD
        await a.store_and_release(ENTRY, token, b"answer", 60)
        assert await look(b) == (LockState.FOUND, "", b"answer")
        assert await links[0].client.exists(ENTRY.lock_key) == 0
        assert 0 < await links[0].client.ttl(ENTRY.value_key) <= 60
    finally:
        await a.aclose()
        await b.aclose()


async def test_owner_renews_its_lock_and_a_dead_owner_lets_it_lapse(
    links: list[RedisLink],
) -> None:
    """A held lock outlives its TTL while its owner runs, and lapses soon after the owner stops."""
    a, b = ClusterLocks(links[0], ttl_s=0.3), ClusterLocks(links[1], ttl_s=0.3)
    try:
        assert (await look(a))[0] is LockState.ACQUIRED
        await asyncio.sleep(0.8)
        assert (await look(b))[0] is LockState.HELD
        await a.aclose()  # the owner "dies": renewals stop, the lock is not released
        assert await b.wait(ENTRY, 1.0) == (WaitOutcome.RELEASED, None)
    finally:
        await a.aclose()
        await b.aclose()


async def test_concurrent_misses_on_three_replicas_compute_once(links: list[RedisLink]) -> None:
    """Misses of one entry on three replicas at the same moment run one computation; the others
    wait for it and read its value."""
    compute = Computation()
    flights = [ClusterFlight(ClusterLocks(link), wait_s=5) for link in links]
    try:
        results = await asyncio.gather(*(run(f, compute) for f in flights for _ in range(3)))
        assert compute.runs == 1
        assert sorted(computed for _, computed in results) == [False] * 8 + [True]
        assert all(answer == "answer" for answer, _ in results)
        assert sum(f.snapshot()["single_flight_cluster_waits"] for f in flights) == 8
    finally:
        for flight in flights:
            await flight.aclose()


async def test_an_owners_failure_is_shared_with_its_waiters(links: list[RedisLink]) -> None:
    """When the owner's computation fails, waiters on other replicas fail too instead of asking
    the failing classifier again; the next miss after that computes."""
    compute = Computation()
    owner, waiter = (ClusterFlight(ClusterLocks(link), wait_s=5) for link in links[:2])
    try:
        compute.fail = True
        loop = asyncio.get_running_loop()
        owner_task = loop.create_task(run(owner, compute))
        await compute.started.wait()
        waiter_task = loop.create_task(run(waiter, compute))
        with pytest.raises(RuntimeError):
            await owner_task
        with pytest.raises(ClassifierUnavailable, match="failed on another replica"):
            await waiter_task
        assert compute.runs == 1
        assert waiter.snapshot()["single_flight_shared_failures"] == 1
        compute.fail = False  # a failure mark does not block the next attempt
        assert await run(waiter, compute) == ("answer", True)
    finally:
        await owner.aclose()
        await waiter.aclose()


async def test_a_waiter_takes_over_when_the_owner_is_cancelled(links: list[RedisLink]) -> None:
    """An owner cancelled mid-computation (its message's deadline, shutdown) frees the lock at
    once, and a waiter computes the value itself."""
    compute = Computation(delay_s=0.3)
    owner, waiter = (ClusterFlight(ClusterLocks(link), wait_s=5) for link in links[:2])
    try:
        loop = asyncio.get_running_loop()
        owner_task = loop.create_task(run(owner, compute))
        await compute.started.wait()
        waiter_task = loop.create_task(run(waiter, compute))
        await waiting(waiter)
        owner_task.cancel()
        assert await waiter_task == ("answer", True)
        assert waiter.snapshot()["single_flight_takeovers"] == 1
        assert compute.runs == 2
    finally:
        await owner.aclose()
        await waiter.aclose()


async def test_the_wait_is_bounded(links: list[RedisLink]) -> None:
    """A waiter whose owner neither finishes nor dies computes (and stores) the value itself
    after SINGLE_FLIGHT_WAIT_S."""
    stuck = ClusterLocks(links[0])
    waiter = ClusterFlight(ClusterLocks(links[1]), wait_s=0.3)
    try:
        assert (await look(stuck))[0] is LockState.ACQUIRED
        started = asyncio.get_running_loop().time()
        assert await run(waiter, Computation(0)) == ("answer", True)
        assert 0.3 <= asyncio.get_running_loop().time() - started < 0.6
        assert waiter.snapshot()["single_flight_wait_timeouts"] == 1
        assert await links[0].client.get(ENTRY.value_key) == b"answer"
    finally:
        await stuck.aclose()
        await waiter.aclose()


async def test_without_a_reachable_redis_it_computes_directly() -> None:
    """With Redis down there is no cluster lock: the replica computes at once."""
    link = RedisLink(make_redis("redis://127.0.0.1:1/0", 0.2), "redis://127.0.0.1:1/0")
    assert not await link.connect()
    flight = ClusterFlight(ClusterLocks(link), wait_s=5)
    compute = Computation(0)
    try:
        assert await run(flight, compute) == ("answer", True)
        assert compute.runs == 1
    finally:
        await flight.aclose()
        await link.aclose()
