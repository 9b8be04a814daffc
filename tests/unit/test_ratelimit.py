"""The LLM rate limiter: GCRA pacing in Redis shared by replicas, the local fallback, cool-downs."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.classification.ratelimit import LocalPacer, RateLimiter, burst_for, window_limit
from worker.redisio.clients import make_redis
from worker.redisio.keys import RedisKeys
from worker.redisio.link import RedisLink

KEYS = RedisKeys("unit:")


def max_in_window(times: list[float], window_s: float = 1.0) -> int:
    times = sorted(times)
    best, start = 0, 0
    for end, t in enumerate(times):
        while t - times[start] >= window_s:
            start += 1
        best = max(best, end - start + 1)
    return best


def test_window_limit_is_the_rate_plus_a_tenth() -> None:
    """The documented bound: ceil(rps) per second plus a burst of ceil(rps / 10)."""
    assert (burst_for(20), window_limit(20)) == (2, 22)
    assert (burst_for(0.5), window_limit(0.5)) == (1, 2)
    assert (burst_for(0), window_limit(0)) == (0, 0)


def test_local_pacer_lets_a_burst_through_then_spaces_calls() -> None:
    """After a quiet spell burst + 1 calls go at once; the next ones are one interval apart."""
    pacer = LocalPacer(10)
    waits = [pacer.reserve(100.0)[1] for _ in range(5)]
    assert waits == pytest.approx([0.0, 0.0, 0.105, 0.21, 0.315])


@settings(max_examples=80, deadline=None)
@given(
    rps=st.sampled_from([1.0, 3.0, 7.5, 20.0, 100.0]),
    calls=st.lists(
        st.tuples(st.floats(min_value=0, max_value=0.3), st.floats(min_value=0, max_value=0.05)),
        min_size=1,
        max_size=300,
    ),
)
def test_local_pacer_never_exceeds_the_window_limit(
    rps: float, calls: list[tuple[float, float]]
) -> None:
    """Whatever the arrival pattern, and with calls leaving up to 50 ms after their slot, no
    one-second window holds more than the documented bound."""
    pacer = LocalPacer(rps)
    now, sent = 0.0, []
    for gap, lag in calls:
        now += gap
        reserved, wait_s = pacer.reserve(now)
        assert reserved
        sent.append(now + wait_s + lag)
    assert max_in_window(sent) <= window_limit(rps)


async def test_replicas_sharing_redis_stay_under_the_limit_together(
    links: list[RedisLink],
) -> None:
    """Three limiters on one Redis, all busy, start at most rps + burst calls in any second, and
    still reach the full rate together."""
    limiters = [RateLimiter(50, KEYS, link) for link in links]
    loop = asyncio.get_running_loop()
    granted: list[float] = []

    async def call(limiter: RateLimiter) -> None:
        await limiter.acquire()
        granted.append(loop.time())

    started = loop.time()
    await asyncio.gather(*(call(limiters[i % 3]) for i in range(120)))
    took_s = loop.time() - started
    assert max_in_window(granted) <= window_limit(50)
    assert took_s >= (120 - window_limit(50)) / 50
    assert took_s < 120 / 50 + 0.5
    assert sum(limiter.snapshot()["rate_limit_waits"] for limiter in limiters) > 100


async def test_cool_down_holds_every_replica(links: list[RedisLink]) -> None:
    """A cool-down set by one replica (a 429's Retry-After) delays the next call of another."""
    first, second = RateLimiter(0, KEYS, links[0]), RateLimiter(0, KEYS, links[1])
    assert await second.acquire() < 0.05  # unlimited: no wait without a cool-down
    await first.cool_down(0.3)
    await first.cool_down(0.1)  # a shorter cool-down never shortens a longer one
    waited_s = await second.acquire()
    assert 0.25 <= waited_s < 0.6
    assert first.snapshot()["rate_limit_cool_downs"] == 2


async def test_without_redis_the_limit_holds_per_replica() -> None:
    """Without Redis a limiter paces its own calls with the same algorithm."""
    limiter = RateLimiter(20, KEYS)
    loop = asyncio.get_running_loop()
    granted: list[float] = []
    for _ in range(30):
        await limiter.acquire()
        granted.append(loop.time())
    assert max_in_window(granted) <= window_limit(20)
    assert granted[-1] - granted[0] >= (30 - window_limit(20)) / 20 - 0.01
    assert not limiter.shared


async def test_unreachable_redis_falls_back_to_local_pacing() -> None:
    """With a configured Redis that does not answer, calls are still paced, in the process."""
    link = RedisLink(make_redis("redis://127.0.0.1:1/0", 0.2), "redis://127.0.0.1:1/0")
    assert not await link.connect()
    try:
        limiter = RateLimiter(10, KEYS, link)
        loop = asyncio.get_running_loop()
        granted = []
        for _ in range(4):
            await limiter.acquire()
            granted.append(loop.time())
        assert granted[-1] - granted[0] >= 0.2  # two calls of burst, then 0.105 s apart
    finally:
        await link.aclose()


async def test_a_cancelled_waiter_wastes_no_slot(links: list[RedisLink]) -> None:
    """Callers queued behind a replica's one outstanding reservation may give up freely."""
    limiter = RateLimiter(10, KEYS, links[0])
    for _ in range(burst_for(10) + 1):
        await limiter.acquire()  # use up the burst
    loop = asyncio.get_running_loop()
    waiters = [loop.create_task(limiter.acquire()) for _ in range(5)]
    await asyncio.sleep(0.02)
    for task in waiters[1:]:
        task.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
    started = loop.time()
    await limiter.acquire()
    # Only the first waiter's slot was reserved; the next call comes one interval after it.
    assert loop.time() - started < 0.1 + 0.05
