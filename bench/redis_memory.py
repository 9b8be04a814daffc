"""Redis memory per remembered message ID and per cached classification, measured on a real Redis
through the worker's own code.

Message IDs: claims and completes ``--count`` fresh UUID message IDs with ``RedisClaimStore`` under
the default key prefix (so keys are exactly what replicas write: after completion the done marker
stays, the lease and the attempt count are deleted), and divides the growth of ``used_memory`` by
the count; ``MEMORY USAGE`` of a sample of done markers is printed next to it. Cache entries: stores
``--count`` classifications with ``ClassificationCache`` and does the same.

Without ``--redis-url`` it starts a ``redis-server`` of its own on a free loopback port (nothing
else writes there, so ``used_memory`` moves only with what it writes) and stops it at the end; with
one, it deletes exactly the keys it wrote.

    python bench/redis_memory.py [--count 100000] [--redis-url redis://127.0.0.1:6379/15]

Sizing: memory for done markers = bytes_per_id × the IDs processed per DEDUP_TTL_S (deploy/README.md,
"Memory sizing").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from typing import Any

import redis.asyncio as aioredis

from worker.claims.protocol import ClaimAsk, Completion, TokenSource
from worker.claims.redis_store import RedisClaimStore
from worker.classification.cache import ClassificationCache, LocalCache
from worker.classification.classifiers.base import Classification
from worker.redisio.keys import RedisKeys
from worker.redisio.link import LinkState, RedisLink

CHUNK = 2_000
SAMPLE = 200


async def used_memory(client: aioredis.Redis) -> int:
    info = await client.info("memory")
    return int(info["used_memory"])


async def _mean_memory_usage(client: aioredis.Redis, keys: list[str]) -> float:
    sizes = [await client.memory_usage(key) or 0 for key in keys[:SAMPLE]]
    return round(sum(sizes) / max(1, len(sizes)), 1)


async def _process_ids(store: RedisClaimStore, ids: list[str]) -> None:
    for start in range(0, len(ids), CHUNK):
        chunk = ids[start : start + CHUNK]
        claims = await store.claim_many([ClaimAsk(i) for i in chunk])
        await store.complete_many(
            [Completion(i, c.token, False) for i, c in zip(chunk, claims, strict=True)]
        )


async def _store_entries(cache: ClassificationCache, hashes: list[str]) -> None:
    value = Classification("question", 0.87, "keywords:v1")
    for start in range(0, len(hashes), CHUNK):
        await asyncio.gather(*(cache.put(h, value) for h in hashes[start : start + CHUNK]))


async def measure(url: str, count: int, prefix: str = "neiromatrius:") -> dict[str, Any]:
    """Bytes of Redis memory per done marker and per cache entry written under ``prefix``."""
    client = aioredis.Redis.from_url(url)
    keys = RedisKeys(prefix)
    store = RedisClaimStore(client, keys, TokenSource("bench"), lease_s=60, dedup_ttl_s=86_400)
    link = RedisLink(client, url)
    cache = ClassificationCache(
        LocalCache(0), link=link, keys=keys, identity="keywords:v1:bench", ttl_s=604_800
    )
    ids = [str(uuid.uuid4()) for _ in range(count)]
    hashes = [uuid.uuid4().hex for _ in range(count)]  # 32 hex digits, as text_hash gives
    try:
        await client.ping()  # type: ignore[misc]
        link.state = LinkState.CONNECTED  # without the connected line: stdout is the JSON
        before = await used_memory(client)
        await _process_ids(store, ids)
        after_ids = await used_memory(client)
        await _store_entries(cache, hashes)
        after_cache = await used_memory(client)
        left = [keys.claim(i) for i in ids[:SAMPLE]] + [keys.attempts(i) for i in ids[:SAMPLE]]
        return {
            "ids": count,
            "bytes_per_id": round((after_ids - before) / count, 1),
            "memory_usage_per_done_key": await _mean_memory_usage(
                client, [keys.done(i) for i in ids]
            ),
            "claim_and_attempt_keys_left": int(await client.exists(*left)),
            "bytes_per_cache_entry": round((after_cache - after_ids) / count, 1),
            "memory_usage_per_cache_key": await _mean_memory_usage(
                client, [cache.redis_key(h) for h in hashes]
            ),
            "key_prefix": prefix,
        }
    finally:
        await cache.aclose()
        await store.aclose()
        written = [keys.done(i) for i in ids] + [cache.redis_key(h) for h in hashes]
        written += [k async for k in client.scan_iter(match=keys.throughput_pattern)]
        written += keys.stats_shards
        for start in range(0, len(written), 5_000):
            await client.unlink(*written[start : start + 5_000])
        await link.aclose()


@contextlib.contextmanager
def own_redis() -> Iterator[str]:
    """A ``redis-server`` of this run's own on a free loopback port: its URL."""
    binary = shutil.which("redis-server")
    assert binary, "redis-server is not installed: pass --redis-url"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    with tempfile.TemporaryDirectory() as directory:
        args = [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", ""]
        args += ["--appendonly", "no", "--dir", directory]
        process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline, "redis-server did not start"
                    time.sleep(0.02)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            process.terminate()
            process.wait(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--redis-url", help="default: a redis-server of this run's own")
    args = parser.parse_args()
    if args.redis_url:
        print(json.dumps(asyncio.run(measure(args.redis_url, args.count))))
        return
    with own_redis() as url:
        print(json.dumps(asyncio.run(measure(url, args.count))))


if __name__ == "__main__":
    main()
