"""The cluster view: counters, throughput, live replicas, Redis memory and queue depths.

Shared by the monitoring endpoint of every replica and the ``stats`` command (which needs no
replica running). Values only: no URL, password or message text is ever part of it; heartbeats
are reduced to ``REPLICA_FIELDS`` so nothing else a replica wrote can leak through.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any

import aio_pika
import aiormq
import orjson
from aio_pika.abc import AbstractConnection
from redis.exceptions import NoPermissionError

from worker.core.settings import Settings
from worker.observability.breakers import read_breakers
from worker.observability.metrics import CounterName
from worker.observability.table import INFO_NOT_PERMITTED
from worker.observability.table import render_table as render_table  # its old home
from worker.redisio.batching import summed_hashes
from worker.redisio.clients import RedisClient, server_info
from worker.redisio.keys import SHARDS, RedisKeys

WINDOWS_S = (10, 60, 300)
REPLICA_FIELDS = ("id", "host", "pid", "started_at", "last_seen", "in_flight", "processed")
BROKER_UNREACHABLE = "the broker is unreachable"
# Failures of a passive declare that mean "cannot ask the broker now", not a bug.
QUEUE_PROBE_ERRORS: tuple[type[BaseException], ...] = (
    aio_pika.exceptions.AMQPError,
    aiormq.exceptions.AMQPError,
    ConnectionError,
    OSError,
    asyncio.TimeoutError,
    RuntimeError,
)


def rates(counters: dict[str, int]) -> dict[str, float]:
    """Duplicate rate among deliveries seen, cache hit rate among processed messages."""
    processed = counters.get(CounterName.PROCESSED, 0)
    duplicates = counters.get(CounterName.DUPLICATES, 0)
    hits = counters.get(CounterName.CACHE_HITS, 0)
    looked_up = hits + counters.get(CounterName.CACHE_MISSES, 0)
    return {
        "duplicate_rate": round(duplicates / (processed + duplicates), 4)
        if processed + duplicates
        else 0.0,
        "cache_hit_rate": round(hits / looked_up, 4) if looked_up else 0.0,
    }


def all_counters(values: dict[str, int]) -> dict[str, int]:
    return {c.value: int(values.get(c.value, 0)) for c in CounterName}


async def read_counters(redis: RedisClient, keys: RedisKeys) -> dict[str, int]:
    """The cluster counters: the sum of their shards."""
    totals = await summed_hashes(redis, keys.stats_shards)
    return all_counters({name.decode(): value for name, value in totals.items()})


async def read_throughput(
    redis: RedisClient, keys: RedisKeys, now: float | None = None
) -> dict[str, float]:
    """Messages per second for the whole cluster over the last 10 s, 60 s and 5 min (full seconds)."""
    current = int(now if now is not None else time.time())
    seconds = range(current - max(WINDOWS_S), current)
    minutes = range(seconds[0] // 60, seconds[-1] // 60 + 1)
    buckets = [keys.throughput(shard, m * 60) for shard in range(SHARDS) for m in minutes]
    per_second = {int(second): n for second, n in (await summed_hashes(redis, buckets)).items()}
    return {
        f"{w}s": round(sum(per_second.get(s, 0) for s in seconds[-w:]) / w, 2) for w in WINDOWS_S
    }


def replica_entry(heartbeat: dict[str, Any]) -> dict[str, Any]:
    """The published fields of a heartbeat, every one present (``None`` when unknown)."""
    return {name: heartbeat.get(name) for name in REPLICA_FIELDS}


async def read_replicas(redis: RedisClient, keys: RedisKeys) -> list[dict[str, Any]]:
    """Heartbeats of live replicas; IDs whose heartbeat expired are dropped from the set."""
    ids = sorted(m.decode() for m in await redis.smembers(keys.replicas))  # type: ignore[misc]
    if not ids:
        return []
    beats = await redis.mget([keys.replica(i) for i in ids])
    live, gone = [], []
    for replica_id, beat in zip(ids, beats, strict=True):
        if beat is None:
            gone.append(replica_id)
            continue
        try:
            live.append(replica_entry(orjson.loads(beat)))
        except orjson.JSONDecodeError:
            continue  # a heartbeat we cannot read is skipped; it expires on its own
    if gone:
        await redis.srem(keys.replicas, *gone)  # type: ignore[misc]
    return live


async def read_redis_memory(redis: RedisClient) -> dict[str, Any]:
    """The three figures the source document watches (memory, connections, commands per
    second) and evictions, from ``INFO memory``, ``clients`` and ``stats`` (summed over the
    masters of a cluster); ``{"memory": "not permitted"}`` for a user the ACL refuses ``INFO``
    (the worker itself never needs it)."""
    try:
        memory = await server_info(redis, "memory")
        clients = await server_info(redis, "clients")
        stats = await server_info(redis, "stats")
    except NoPermissionError:
        return {"memory": INFO_NOT_PERMITTED}
    evicted = int(stats.get("evicted_keys", 0))
    found: dict[str, Any] = {
        "used_memory": int(memory.get("used_memory", 0)),
        "used_memory_human": memory.get("used_memory_human"),
        "maxmemory": int(memory.get("maxmemory", 0)),
        "maxmemory_policy": memory.get("maxmemory_policy"),
        "evicted_keys": evicted,
        "connected_clients": int(clients.get("connected_clients", 0)),
        "instantaneous_ops_per_sec": int(stats.get("instantaneous_ops_per_sec", 0)),
    }
    if "masters" in memory:
        found["cluster_masters"] = memory["masters"]
    if evicted:
        found["warning"] = (
            f"{evicted} keys were evicted: evicted done markers let duplicates through; "
            "give Redis more memory or shorten DEDUP_TTL_S/CACHE_TTL_S"
        )
    return found


async def read_cluster(redis: RedisClient, keys: RedisKeys) -> dict[str, Any]:
    counters = await read_counters(redis, keys)
    return {
        "scope": "cluster",
        "counters": counters,
        "rates": rates(counters),
        "throughput": await read_throughput(redis, keys),
        "replicas": await read_replicas(redis, keys),
        "redis": await read_redis_memory(redis),
        "breakers": await read_breakers(redis, keys),
    }


@dataclass(frozen=True, slots=True)
class QueueNames:
    """The queues whose depth the view reports."""

    input: str
    dead_letter: str
    unrouted: str | None = None  # ``{RESULTS_EXCHANGE}.unrouted``, unless results are discarded

    @classmethod
    def of(cls, settings: Settings) -> QueueNames:
        return cls(settings.input_queue, settings.dead_letter_queue, settings.unrouted_queue)

    def roles(self) -> tuple[tuple[str, str], ...]:
        roles = (("input", self.input), ("dead_letter", self.dead_letter))
        return roles + ((("unrouted", self.unrouted),) if self.unrouted else ())


def unknown_depths(names: QueueNames, reason: str) -> dict[str, Any]:
    """The ``queues`` section when the broker could not be asked."""
    found: dict[str, Any] = {
        role: {"name": name, "messages": None, "consumers": None} for role, name in names.roles()
    }
    found["error"] = reason
    return found


async def _queue_depth(
    connection: AbstractConnection, name: str, timeout_s: float
) -> dict[str, Any]:
    # A passive declare on a channel of its own: it never creates the queue, and the 404 it
    # answers for a missing queue closes only this channel. The underlying channel is used because
    # aio-pika's robust channel would return a cached declaration with a stale count.
    channel = await asyncio.wait_for(connection.channel(), timeout_s)
    try:
        underlay = await channel.get_underlay_channel()
        declared = await underlay.queue_declare(name, passive=True, timeout=timeout_s)
        return {
            "name": name,
            "messages": declared.message_count or 0,
            "consumers": declared.consumer_count or 0,
        }
    except aiormq.exceptions.ChannelNotFoundEntity:
        return {"name": name, "messages": None, "consumers": None, "missing": True}
    finally:
        with contextlib.suppress(*QUEUE_PROBE_ERRORS):
            await channel.close()


async def read_queue_depths(
    connection: AbstractConnection, names: QueueNames, *, timeout_s: float = 2.0
) -> dict[str, Any]:
    """Messages ready for delivery and consumers of the input and dead-letter queues.

    ``messages`` counts what waits in the queue; deliveries a replica holds unacknowledged are
    not in it (they are each replica's ``in_flight``).
    """
    return {role: await _queue_depth(connection, name, timeout_s) for role, name in names.roles()}
