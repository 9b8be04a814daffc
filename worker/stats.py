"""The cluster view: counters, throughput, live replicas and Redis memory, read from Redis.

Shared by the monitoring endpoint of every replica and the ``stats`` command (which needs no
replica running). Values only: no URL, password or message text is ever part of it.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from redis.asyncio import Redis

from worker.keys import Counter, RedisKeys

WINDOWS_S = (10, 60, 300)


def rates(counters: dict[str, int]) -> dict[str, float]:
    """Duplicate rate among deliveries seen, cache hit rate among processed messages."""
    processed = counters.get(Counter.PROCESSED, 0)
    duplicates = counters.get(Counter.DUPLICATES, 0)
    hits = counters.get(Counter.CACHE_HITS, 0)
    looked_up = hits + counters.get(Counter.CACHE_MISSES, 0)
    return {
        "duplicate_rate": round(duplicates / (processed + duplicates), 4)
        if processed + duplicates
        else 0.0,
        "cache_hit_rate": round(hits / looked_up, 4) if looked_up else 0.0,
    }


def all_counters(values: dict[str, int]) -> dict[str, int]:
    return {c.value: int(values.get(c.value, 0)) for c in Counter}


async def read_counters(redis: Redis, keys: RedisKeys) -> dict[str, int]:
    raw: dict[bytes, bytes] = await redis.hgetall(keys.stats)  # type: ignore[misc]
    return all_counters({k.decode(): int(v) for k, v in raw.items()})


async def read_throughput(
    redis: Redis, keys: RedisKeys, now: float | None = None
) -> dict[str, float]:
    """Messages per second for the whole cluster over the last 10 s, 60 s and 5 min (full seconds)."""
    current = int(now if now is not None else time.time())
    seconds = list(range(current - max(WINDOWS_S), current))
    values = await redis.mget([keys.throughput(s) for s in seconds])
    per_second = {s: int(v) if v is not None else 0 for s, v in zip(seconds, values, strict=True)}
    return {f"{w}s": round(sum(per_second[s] for s in seconds[-w:]) / w, 2) for w in WINDOWS_S}


async def read_replicas(redis: Redis, keys: RedisKeys) -> list[dict[str, Any]]:
    """Heartbeats of live replicas; IDs whose heartbeat expired are dropped from the set."""
    ids = sorted(m.decode() for m in await redis.smembers(keys.replicas))  # type: ignore[misc]
    if not ids:
        return []
    beats = await redis.mget([keys.replica(i) for i in ids])
    live, gone = [], []
    for replica_id, beat in zip(ids, beats, strict=True):
        if beat is None:
            gone.append(replica_id)
        else:
            live.append(orjson.loads(beat))
    if gone:
        await redis.srem(keys.replicas, *gone)  # type: ignore[misc]
    return live


async def read_redis_memory(redis: Redis) -> dict[str, Any]:
    memory = await redis.info("memory")
    stats = await redis.info("stats")
    evicted = int(stats.get("evicted_keys", 0))
    found: dict[str, Any] = {
        "used_memory": int(memory.get("used_memory", 0)),
        "used_memory_human": memory.get("used_memory_human"),
        "maxmemory": int(memory.get("maxmemory", 0)),
        "maxmemory_policy": memory.get("maxmemory_policy"),
        "evicted_keys": evicted,
    }
    if evicted:
        found["warning"] = (
            f"{evicted} keys were evicted: evicted done markers let duplicates through; "
            "give Redis more memory or shorten DEDUP_TTL_S/CACHE_TTL_S"
        )
    return found


async def read_cluster(redis: Redis, keys: RedisKeys) -> dict[str, Any]:
    counters = await read_counters(redis, keys)
    return {
        "scope": "cluster",
        "counters": counters,
        "rates": rates(counters),
        "throughput": await read_throughput(redis, keys),
        "replicas": await read_replicas(redis, keys),
        "redis": await read_redis_memory(redis),
    }


def render_table(stats: dict[str, Any]) -> str:
    """A readable summary for people (the ``stats`` command without ``--json``)."""
    lines = [f"Neiromatrius worker — {stats.get('scope', 'cluster')} stats"]
    cache = stats.get("cache")
    if cache:
        lines.append(f"  cache            {cache['status']} ({cache['type']})")
    lines.append("")
    lines.append("  counters")
    for name, value in stats["counters"].items():
        lines.append(f"    {name:<18}{value:>12,}")
    lines.append("")
    r = stats["rates"]
    lines.append(f"  duplicate rate   {r['duplicate_rate']:.2%}")
    lines.append(f"  cache hit rate   {r['cache_hit_rate']:.2%}")
    tp = stats["throughput"]
    lines.append("  throughput       " + "  ".join(f"{k}: {v:,.1f}/s" for k, v in tp.items()))
    replicas = stats.get("replicas", [])
    lines.append("")
    lines.append(f"  live replicas    {len(replicas)}")
    for rep in replicas:
        age = time.time() - float(rep.get("last_seen", 0))
        lines.append(
            f"    {rep['id']:<28} pid {rep.get('pid', '?'):<8} in flight {rep.get('in_flight', 0):<5}"
            f" processed {rep.get('processed', 0):<8,} seen {age:.0f}s ago"
        )
    redis = stats.get("redis")
    if redis:
        lines.append("")
        lines.append(
            f"  redis memory     {redis.get('used_memory_human')} "
            f"(max {redis.get('maxmemory') or 'unlimited'}, policy {redis.get('maxmemory_policy')},"
            f" evicted {redis.get('evicted_keys')})"
        )
        if "warning" in redis:
            lines.append(f"  WARNING: {redis['warning']}")
    queues = stats.get("queues")
    if queues:
        lines.append("  queues           " + "  ".join(f"{k}: {v}" for k, v in queues.items()))
    return "\n".join(lines)
