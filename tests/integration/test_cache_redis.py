"""REDIS_CACHE_URL: the classification cache on a Redis of its own that may evict freely, while the
claims, done markers and counters stay on REDIS_URL (issue 14, acceptance 3, second half)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests.conftest import Names
from tests.integration.servers import SpareRedis, free_port
from tests.integration.support import (
    Replicas,
    ResultSink,
    body,
    cluster_counters,
    publish_bodies,
    run_cli,
    wait_counter,
)
from tests.integration.test_monitoring import get, get_json
from worker.observability.metrics import CounterName
from worker.redisio.link import CACHE_LINES, CONNECTED_LINE, FAILED_LINE

pytestmark = pytest.mark.integration

UNIQUE = 8_000
DUPLICATES = 1_000


@pytest.fixture
def small_lru_redis(tmp_path: Path) -> Iterator[SpareRedis]:
    """A 2 MB ``allkeys-lru`` Redis of the test's own: an empty one already uses about 0.9 MB."""
    directory = tmp_path / "cache-redis"
    directory.mkdir()
    server = SpareRedis(directory, maxmemory="2mb", maxmemory_policy="allkeys-lru").start()
    try:
        yield server
    finally:
        server.stop()


async def _evicted_keys(client: aioredis.Redis) -> int:
    return int((await client.info("stats"))["evicted_keys"])


async def _count(client: aioredis.Redis, pattern: str) -> int:
    return len([key async for key in client.scan_iter(match=pattern, count=1000)])


async def test_an_evicting_cache_redis_never_lets_an_id_through_twice(
    names: Names,
    redis_client: aioredis.Redis,
    amqp: object,
    tmp_path: Path,
    small_lru_redis: SpareRedis,
) -> None:
    """8,000 unique texts plus 1,000 duplicates on two replicas, the cache on a 2 MB allkeys-lru
    Redis that evicts while the claims sit on REDIS_URL: every ID is published exactly once, the
    duplicates are counted, and stats, metrics and the logs tell the two Redis instances apart."""
    uniques = [body(f"e-{i}", f"Заказ {i}: где посылка номер {i * 7919}?") for i in range(UNIQUE)]
    traffic = uniques + [dict(uniques[i]) for i in range(0, 2 * DUPLICATES, 2)]
    cache = aioredis.Redis.from_url(small_lru_redis.url)
    env = names.env(PREFETCH="256", REDIS_CACHE_URL=small_lru_redis.url)
    replicas = Replicas(tmp_path)
    try:
        async with ResultSink(names) as sink:
            for _ in range(2):
                replicas.start(env)
            for replica in replicas.all:
                await replica.started()
            await publish_bodies(names, traffic)
            await sink.wait_for_ids({m["message_id"] for m in uniques}, timeout_s=180)
            await wait_counter(
                redis_client, names, CounterName.DUPLICATES, DUPLICATES, timeout_s=60
            )
            await sink.settle(quiet_s=1.5)

            assert await _evicted_keys(cache) > 0, "the cache Redis never had to evict"
            assert sink.total == UNIQUE
            assert all(len(results) == 1 for results in sink.by_id.values())
            counters = await cluster_counters(redis_client, names)
            assert counters[CounterName.PROCESSED] == UNIQUE
            assert counters[CounterName.DUPLICATES] == DUPLICATES
            # Each family on its own Redis: no done marker on the evicting one, no cache entry
            # on the claims one.
            assert await _count(cache, names.keys.done("*")) == 0
            assert await _count(cache, names.keys.cache_pattern) > 0
            assert await _count(redis_client, names.keys.cache_pattern) == 0

            port = replicas.all[0].stats_port
            stats = await get_json(port, "/api/monitoring/stats")
            assert stats["cache"] == {"status": "redis_connected", "type": "redis"}
            section = stats["cache_redis"]
            assert section["status"] == "redis_connected"
            assert section["redis"]["maxmemory_policy"] == "allkeys-lru"
            assert section["redis"]["evicted_keys"] > 0
            assert "warning" not in section["redis"], "evicting is this Redis's job"
            _, metrics = await get(port, "/metrics")
            assert b"neiromatrius_cache_redis_connected 1.0" in metrics

            log = replicas.all[0].log_text()
            assert CONNECTED_LINE in log
            assert CACHE_LINES.connected in log
            assert FAILED_LINE not in log
            assert CACHE_LINES.failed not in log
    finally:
        replicas.close()
        await cache.aclose()

    code, lines = run_cli(env, "stats", "--json")
    assert code == 0, lines
    shown = json.loads("\n".join(lines))
    assert shown["cache_redis"]["redis"]["maxmemory_policy"] == "allkeys-lru"


async def test_an_unreachable_cache_redis_costs_cache_misses_only(
    names: Names, redis_client: aioredis.Redis, amqp: object, tmp_path: Path
) -> None:
    """With REDIS_CACHE_URL pointing at a port nobody listens on, a replica still claims and
    processes every message once and is ready, logging the cache Redis's failure line (not the
    claims Redis's); once that Redis starts, the replica connects to it and fills it."""
    port = free_port()
    directory = tmp_path / "late-cache"
    directory.mkdir()
    late = SpareRedis(directory, port)
    env = names.env(REDIS_CACHE_URL=late.url)
    replicas = Replicas(tmp_path)
    try:
        async with ResultSink(names) as sink:
            replica = replicas.start(env)
            await replica.started()
            first = [body(f"a-{i}", f"Верните деньги за заказ {i}") for i in range(300)]
            await publish_bodies(names, first + first[:50])
            await sink.wait_for_ids({m["message_id"] for m in first}, timeout_s=60)
            await wait_counter(redis_client, names, CounterName.DUPLICATES, 50, timeout_s=30)
            assert sink.total == 300
            status, ready = await get(replica.stats_port, "/health/ready")
            assert status == 200, ready
            stats = await get_json(replica.stats_port, "/api/monitoring/stats")
            assert stats["cache"]["status"] == "redis_connected"
            assert stats["cache_redis"] == {"status": "redis_disconnected", "redis": None}
            log = replica.log_text()
            assert CACHE_LINES.failed in log
            assert FAILED_LINE not in log

            late.start()
            await replica.wait_for_log(CACHE_LINES.connected, timeout_s=15)
            second = [body(f"b-{i}", f"Новый текст номер {i}") for i in range(100)]
            await publish_bodies(names, second)
            await sink.wait_for_ids({m["message_id"] for m in second}, timeout_s=60)
            cache = aioredis.Redis.from_url(late.url)
            try:
                assert await _count(cache, names.keys.cache_pattern) >= 100
            finally:
                await cache.aclose()
            counters = await cluster_counters(redis_client, names)
            assert counters[CounterName.PROCESSED] == 400
    finally:
        replicas.close()
        late.stop()
