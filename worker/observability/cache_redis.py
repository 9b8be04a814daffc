"""The cache Redis (``REDIS_CACHE_URL``) in the stats document and in ``/metrics``.

The stats document's ``cache_redis`` section is ``null`` when the cache lives on ``REDIS_URL``
(whose state is the contract's ``cache`` section). With a cache Redis of its own it is
``{"status": "redis_connected" | "redis_disconnected", "redis": {...} | null}``, ``redis`` being
the same figures as the top-level ``redis`` section (memory, policy, evictions, clients). Evictions
are what this Redis is for, so its section carries no eviction warning.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, Metric

from worker.core.settings import Settings
from worker.observability.exposition import gauge
from worker.observability.stats import read_redis_memory
from worker.redisio.link import CACHE_LINES, REDIS_ERRORS, LinkState, RedisLink
from worker.redisio.roles import client_of


async def cache_redis_section(link: RedisLink | None) -> dict[str, Any] | None:
    """The ``cache_redis`` section now; ``None`` without a cache Redis of its own."""
    if link is None:
        return None
    figures: dict[str, Any] | None = None
    if link.available:
        try:
            figures = await read_redis_memory(link.client)
        except REDIS_ERRORS as exc:
            link.report_aside(exc)
        else:
            figures.pop("warning", None)
    return {"status": link.state.value, "redis": figures}


def cache_redis_metrics(section: dict[str, Any] | None) -> Iterator[Metric]:
    """Whether the cache Redis answers, and its memory and evictions (nothing without one)."""
    if section is None:
        return
    yield gauge(
        "neiromatrius_cache_redis_connected",
        "1 when the cache Redis (REDIS_CACHE_URL) is reachable.",
        section["status"] == "redis_connected",
    )
    figures = section.get("redis") or {}
    for name, field, documentation in (
        ("used_memory_bytes", "used_memory", "Memory the cache Redis uses, in bytes."),
        ("maxmemory_bytes", "maxmemory", "The cache Redis's maxmemory in bytes (0: no limit)."),
    ):
        if isinstance(figures.get(field), int):
            yield gauge(f"neiromatrius_cache_redis_{name}", documentation, figures[field])
    if isinstance(figures.get("evicted_keys"), int):
        evicted = CounterMetricFamily(
            "neiromatrius_cache_redis_evicted_keys",
            "Keys the cache Redis evicted (expected there: an evicted entry is a cache miss).",
        )
        evicted.add_metric([], float(figures["evicted_keys"]))
        yield evicted


async def probe_cache_redis(settings: Settings) -> dict[str, Any] | None:
    """The ``cache_redis`` section asked over a client of its own (the ``stats`` command)."""
    if not settings.cache_redis_separate:
        return None
    try:
        client = await client_of(settings, settings.redis_cache_url, CACHE_LINES.setting)
    except REDIS_ERRORS:
        return {"status": LinkState.DISCONNECTED.value, "redis": None}
    try:
        figures = await read_redis_memory(client)
    except REDIS_ERRORS:
        return {"status": LinkState.DISCONNECTED.value, "redis": None}
    finally:
        await client.aclose()
    figures.pop("warning", None)
    return {"status": LinkState.CONNECTED.value, "redis": figures}
