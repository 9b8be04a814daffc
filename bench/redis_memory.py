"""Redis memory per remembered message ID, measured on a real Redis through the worker's own code.

Claims and completes ``--count`` fresh UUID message IDs with ``RedisClaimStore`` under the default
key prefix (so keys are exactly what replicas write), and divides the growth of ``used_memory`` by
the count. Runs in database 15 by default and deletes exactly the keys it wrote.

    python bench/redis_memory.py [--count 100000] [--redis-url redis://127.0.0.1:6379/15]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import uuid
from typing import Any

import redis.asyncio as aioredis

from worker.claims.protocol import ClaimAsk, Completion, TokenSource
from worker.claims.redis_store import RedisClaimStore
from worker.redisio.keys import RedisKeys


async def used_memory(client: aioredis.Redis) -> int:
    info = await client.info("memory")
    return int(info["used_memory"])


async def measure(url: str, count: int, prefix: str = "neiromatrius:") -> dict[str, Any]:
    """Bytes of Redis memory per done marker written by the worker under ``prefix``."""
    client = aioredis.Redis.from_url(url)
    keys = RedisKeys(prefix)
    store = RedisClaimStore(client, keys, TokenSource("bench"), lease_s=60, dedup_ttl_s=86_400)
    ids = [str(uuid.uuid4()) for _ in range(count)]
    try:
        before = await used_memory(client)
        for start in range(0, count, 2_000):
            chunk = ids[start : start + 2_000]
            claims = await store.claim_many([ClaimAsk(i) for i in chunk])
            await store.complete_many(
                [Completion(i, c.token, False) for i, c in zip(chunk, claims, strict=True)]
            )
        after = await used_memory(client)
        return {
            "ids": count,
            "bytes_per_id": round((after - before) / count, 1),
            "key_prefix": prefix,
        }
    finally:
        await store.aclose()
        written = [keys.done(i) for i in ids]
        written += [k async for k in client.scan_iter(match=keys.throughput_pattern)]
        written += keys.stats_shards
        for start in range(0, len(written), 5_000):
            await client.unlink(*written[start : start + 5_000])
        await client.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/15")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(measure(args.redis_url, args.count))))


if __name__ == "__main__":
    main()
