"""The claim store a replica's settings call for: Redis with the memory store as its fallback,
or the memory store alone without Redis."""

from __future__ import annotations

from worker.claims.fallback import FallbackClaimStore
from worker.claims.memory_store import MemoryClaimStore
from worker.claims.protocol import ClaimStore, TokenSource
from worker.claims.redis_store import RedisClaimStore
from worker.core.settings import Settings
from worker.observability.counters import Counters
from worker.redisio.keys import RedisKeys
from worker.redisio.link import RedisLink


def build_claim_store(
    settings: Settings,
    link: RedisLink | None,
    keys: RedisKeys,
    counters: Counters,
    *,
    replica_id: str,
) -> ClaimStore:
    """Claims in Redis with the memory store as its fallback; the memory store alone without."""
    memory_prefix = f"{replica_id}/memory"
    memory = MemoryClaimStore(
        TokenSource(memory_prefix),
        lease_s=settings.claim_lease_s,
        dedup_ttl_s=settings.dedup_ttl_s,
        max_done=settings.memory_dedup_size,
        max_attempts=settings.max_attempts,
    )
    if link is None:
        return memory
    return FallbackClaimStore(
        build_redis_store(settings, link, keys, replica_id),
        memory,
        link=link,
        keys=keys,
        counters=counters,
        memory_token_prefix=memory_prefix,
        dedup_ttl_s=settings.dedup_ttl_s,
        strict=settings.redis_failure_mode == "strict",
        fallback_after_s=settings.redis_fallback_after_s,
    )


def build_redis_store(
    settings: Settings, link: RedisLink, keys: RedisKeys, replica_id: str
) -> RedisClaimStore:
    return RedisClaimStore(
        link.client,
        keys,
        TokenSource(replica_id),
        lease_s=settings.claim_lease_s,
        dedup_ttl_s=settings.dedup_ttl_s,
        max_attempts=settings.max_attempts,
        wait_replicas=settings.redis_wait_replicas,
        # Below the socket timeout, so a WAIT that times out is an answer, not an outage.
        wait_timeout_ms=max(1, int(settings.redis_timeout_s * 500)),
    )
