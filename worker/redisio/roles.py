"""The two Redis roles a replica may use, each on its own link.

- The claims Redis (``REDIS_URL``): claims, done markers, attempts, counters, heartbeats and the
  LLM rate limit. Losing one of its keys can cost correctness (a duplicate processed again, a burst
  over the rate limit), so it should never evict (``noeviction``, see deploy/README.md).
- The cache Redis (``REDIS_CACHE_URL``, optional): the classification cache and its single-flight
  locks, which may be evicted at any time (``allkeys-lru``): an evicted entry is a cache miss, an
  evicted lock a text classified twice. While it is unreachable, replicas classify without the
  shared cache; claims do not wait for it. Without ``REDIS_CACHE_URL`` the cache shares the claims
  link.

Each link logs lines of its own (``LinkLines``): the contract's for the claims Redis, lines naming
``REDIS_CACHE_URL`` for the cache Redis.
"""

from __future__ import annotations

from contextlib import AsyncExitStack

import structlog

from worker.core.errors import ConfigError
from worker.core.redaction import scrub
from worker.core.settings import Settings
from worker.redisio.clients import RedisClient, make_client
from worker.redisio.link import (
    CACHE_LINES,
    CLAIMS_LINES,
    FALLBACK_IN_MEMORY,
    FALLBACK_NO_SHARED_CACHE,
    FALLBACK_STRICT,
    RedisLink,
)

log = structlog.get_logger("worker.redis")

IN_MEMORY_LINE = "In-memory mode: no REDIS_URL, claims, cache and counters are per replica"
# With a cache Redis of its own, the claims Redis's outage leaves the shared cache in place.
FALLBACK_CLAIMS_ONLY = "in-memory claims and counters until Redis is back (the cache stays shared)"


async def client_of(
    settings: Settings, url: str, setting: str, *, log_assumed: bool = False
) -> RedisClient:
    """A client for ``url`` (in ``REDIS_MODE`` for ``REDIS_URL``; the cache Redis's mode is asked
    of the server); a URL redis-py refuses (a bad query parameter) names ``setting``."""
    mode = settings.redis_mode if setting == CLAIMS_LINES.setting else "auto"
    try:
        return await make_client(
            url,
            mode,
            settings.redis_timeout_s,
            sentinel_password=settings.redis_sentinel_password.get_secret_value(),
            log_assumed=log_assumed,
        )
    except ValueError as exc:
        raise ConfigError(
            f"invalid setting {setting}: {scrub(str(exc), settings.secrets)}"
        ) from None


async def claims_link(settings: Settings) -> RedisLink | None:
    """The link to ``REDIS_URL``; ``None`` (and the contract's in-memory line) without it."""
    if not settings.redis_enabled:
        log.info(IN_MEMORY_LINE, note="duplicates are possible across replicas")
        return None
    if settings.redis_failure_mode == "strict":
        fallback = FALLBACK_STRICT
    elif settings.cache_redis_separate:
        fallback = FALLBACK_CLAIMS_ONLY
    else:
        fallback = FALLBACK_IN_MEMORY
    return RedisLink(
        await client_of(settings, settings.redis_url, CLAIMS_LINES.setting, log_assumed=True),
        settings.redis_url,
        secrets=settings.secrets,
        fallback=fallback,
        lines=CLAIMS_LINES,
    )


async def cache_link(settings: Settings, claims: RedisLink | None) -> RedisLink | None:
    """The cache's link: one of its own for ``REDIS_CACHE_URL``, else ``claims`` itself."""
    if not settings.cache_redis_separate:
        return claims
    return RedisLink(
        await client_of(settings, settings.redis_cache_url, CACHE_LINES.setting, log_assumed=True),
        settings.redis_cache_url,
        secrets=settings.secrets,
        fallback=FALLBACK_NO_SHARED_CACHE,
        lines=CACHE_LINES,
    )


async def connect_links(stack: AsyncExitStack, *links: RedisLink | None) -> None:
    """Connect each distinct link once, closed by ``stack``. One that cannot connect is retried in
    the background: the claims link's callers fall back meanwhile, the cache link's miss."""
    for link in dict.fromkeys(link for link in links if link is not None):
        stack.push_async_callback(link.aclose)
        await link.connect()
