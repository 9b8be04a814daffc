"""The stats view's parts: throughput windows, rates, heartbeats, the table, and the HTTP endpoints."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import fakeredis
import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from worker.observability.counters import Counters, ReplicaIdentity
from worker.observability.http import ReplicaView, build_app
from worker.observability.metrics import CounterName
from worker.observability.stats import (
    QueueNames,
    rates,
    read_counters,
    read_replicas,
    read_throughput,
    unknown_depths,
)
from worker.observability.table import render_table
from worker.redisio.keys import RedisKeys

KEYS = RedisKeys("unit:")


@pytest.fixture
def redis() -> fakeredis.FakeAsyncRedis:
    return fakeredis.FakeAsyncRedis()


async def test_throughput_counts_full_seconds_per_window(redis: fakeredis.FakeAsyncRedis) -> None:
    """Each window averages the per-second buckets of its last full seconds; the current,
    unfinished second is left out."""
    now = 1_000_000
    for age_s in range(1, 301):
        await redis.set(KEYS.throughput(now - age_s), 10 if age_s <= 10 else 2)
    await redis.set(KEYS.throughput(now), 999)  # the second in progress
    throughput = await read_throughput(redis, KEYS, now=now + 0.7)
    assert throughput == {
        "10s": 10.0,
        "60s": round((10 * 10 + 50 * 2) / 60, 2),
        "300s": round((10 * 10 + 290 * 2) / 300, 2),
    }


async def test_counters_are_all_present(redis: fakeredis.FakeAsyncRedis) -> None:
    """Counters never written read as zero, so the stats always list every counter."""
    await redis.hset(KEYS.stats, mapping={"processed": 7, "duplicates": 3})
    counters = await read_counters(redis, KEYS)
    assert counters["processed"] == 7
    assert counters["duplicates"] == 3
    assert set(counters) == {c.value for c in CounterName}
    assert all(counters[c] == 0 for c in CounterName if c not in {"processed", "duplicates"})


def test_rates_are_shares_of_what_was_seen() -> None:
    """The duplicate rate is duplicates among deliveries, the hit rate hits among lookups; both
    are zero before any traffic."""
    assert rates({"processed": 75, "duplicates": 25, "cache_hits": 30, "cache_misses": 45}) == {
        "duplicate_rate": 0.25,
        "cache_hit_rate": 0.4,
    }
    assert rates({}) == {"duplicate_rate": 0.0, "cache_hit_rate": 0.0}


async def test_replicas_show_only_published_fields_and_drop_expired(
    redis: fakeredis.FakeAsyncRedis,
) -> None:
    """Live heartbeats are listed with exactly id, host, pid, started, last seen, in flight and
    processed (nothing else a heartbeat carries); an ID whose heartbeat expired leaves the set."""
    beat = {
        "id": "r-1",
        "host": "h",
        "pid": 42,
        "started_at": 100.0,
        "last_seen": 200.0,
        "in_flight": 3,
        "processed": 9,
        "anything_else": "redis://:secret@host",
    }
    await redis.set(KEYS.replica("r-1"), orjson.dumps(beat))
    await redis.sadd(KEYS.replicas, "r-1", "r-gone")
    live = await read_replicas(redis, KEYS)
    assert live == [{k: v for k, v in beat.items() if k != "anything_else"}]
    assert await redis.smembers(KEYS.replicas) == {b"r-1"}


def test_table_shows_replicas_memory_warning_and_queues() -> None:
    """The table names each replica with its start time and last heartbeat, the Redis eviction
    warning, and the queue depths (or why they are unknown)."""
    stats = {
        "cache": {"status": "redis_connected", "type": "redis"},
        "scope": "cluster",
        "counters": {"processed": 1234, "duplicates": 5},
        "rates": {"duplicate_rate": 0.004, "cache_hit_rate": 0.5},
        "throughput": {"10s": 1.5, "60s": 1.0, "300s": 0.2},
        "replicas": [
            {
                "id": "r-1",
                "host": "h",
                "pid": 42,
                "started_at": 0.0,
                "last_seen": 990.0,
                "in_flight": 2,
                "processed": 1234,
            }
        ],
        "redis": {
            "used_memory_human": "1.00M",
            "maxmemory": 0,
            "maxmemory_policy": "volatile-lru",
            "evicted_keys": 3,
            "warning": "3 keys were evicted: evicted done markers let duplicates through",
        },
        "queues": {
            "input": {"name": "in", "messages": 12, "consumers": 3},
            "dead_letter": {"name": "dead", "messages": 1, "consumers": 0},
        },
    }
    table = render_table(stats, now=1000.0)
    assert "redis_connected (redis)" in table
    assert "1,234" in table
    assert "live replicas    1" in table
    assert "started 1970-01-01 00:00:00Z  seen 10s ago" in table
    assert "WARNING: 3 keys were evicted" in table
    assert "in: 12 waiting, 3 consumers" in table
    assert "dead: 1 waiting, 0 consumers" in table
    stats["queues"] = unknown_depths(QueueNames("in", "dead"), "the broker is unreachable")
    table = render_table(stats, now=1000.0)
    assert "in: ?" in table
    assert "queue depths unknown: the broker is unreachable" in table


@dataclass
class Facts:
    """What the view reads live from the replica, set by the test."""

    broker: bool = True
    consuming: bool = True


@dataclass
class Endpoints:
    """The endpoints of a replica without Redis, with its counters and live facts."""

    http: TestClient[Any, Any]
    counters: Counters
    facts: Facts


@pytest.fixture
async def endpoints() -> AsyncIterator[Endpoints]:
    counters = Counters(cluster=False)
    facts = Facts()
    view = ReplicaView(
        identity=ReplicaIdentity.create("unit-replica"),
        counters=counters,
        link=None,
        keys=KEYS,
        in_flight=lambda: 4,
        broker_connected=lambda: facts.broker,
        consuming=lambda: facts.consuming,
        classifier_tallies=lambda: {"llm_requests": 3, "rate_limit_waits": 1},
    )
    async with TestClient(TestServer(build_app(view))) as http:
        yield Endpoints(http, counters, facts)


async def test_ready_says_why_it_is_not(endpoints: Endpoints) -> None:
    """Readiness is 200 while connected and consuming, and 503 naming the broker or the stopped
    consumer otherwise; liveness stays 200 throughout."""
    http, state = endpoints.http, endpoints.facts
    response = await http.get("/health/ready")
    assert response.status == 200
    state.consuming = False
    response = await http.get("/health/ready")
    assert response.status == 503
    assert await response.json() == {"status": "not_ready", "reason": "the consumer is not running"}
    state.broker = False
    response = await http.get("/health/ready")
    assert response.status == 503
    assert (await response.json())["reason"] == "the broker is unreachable"
    assert (await http.get("/health/live")).status == 200


async def test_without_redis_the_stats_are_this_replicas(endpoints: Endpoints) -> None:
    """Without Redis the stats report cache memory/memory, scope instance, this replica's counters
    and throughput, and itself as the one live replica."""
    http, counters = endpoints.http, endpoints.counters
    counters.record(CounterName.PROCESSED, 6)
    counters.record(CounterName.DUPLICATES, 2)
    counters.record(CounterName.CACHE_HITS, 2)
    counters.record(CounterName.CACHE_MISSES, 4)
    stats = await (await http.get("/api/monitoring/stats")).json()
    assert stats["cache"] == {"status": "memory", "type": "memory"}
    assert stats["scope"] == "instance"
    assert stats["counters"]["processed"] == 6
    assert stats["rates"] == {"duplicate_rate": 0.25, "cache_hit_rate": round(2 / 6, 4)}
    assert set(stats["throughput"]) == {"10s", "60s", "300s"}
    (own,) = stats["replicas"]
    assert own["id"] == "unit-replica"
    assert own["in_flight"] == 4
    assert own["processed"] == 6
    assert own["started_at"] <= own["last_seen"] <= time.time()
    assert stats["redis"] is None
    # The classifier's own tallies (LLM calls, errors, waits) are part of this replica's view.
    assert stats["replica"]["classifier"] == {"llm_requests": 3, "rate_limit_waits": 1}
