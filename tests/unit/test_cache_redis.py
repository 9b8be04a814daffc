"""REDIS_CACHE_URL: its validation, its own link and log lines, and how stats and metrics show it."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from structlog.testing import capture_logs

from tests.unit.test_redis_figures import InfoOnly, redis_section
from worker.app import build_base
from worker.core.errors import ConfigError
from worker.core.settings import load_settings
from worker.observability.cache_redis import cache_redis_section
from worker.observability.counters import Counters, ReplicaIdentity
from worker.observability.http import ReplicaCollector, ReplicaView
from worker.observability.stats import render_table
from worker.redisio.keys import RedisKeys
from worker.redisio.link import CACHE_LINES, CLAIMS_LINES, LinkState, RedisLink
from worker.redisio.roles import FALLBACK_CLAIMS_ONLY, cache_link, claims_link

CLAIMS = "redis://127.0.0.1:6379/0"


def test_a_bad_cache_url_names_the_variable() -> None:
    """An unparseable or non-Redis REDIS_CACHE_URL stops start-up with a line naming it."""
    with pytest.raises(ConfigError, match="invalid setting REDIS_CACHE_URL: must start with"):
        load_settings(redis_url=CLAIMS, redis_cache_url="http://cache:6379")
    with pytest.raises(ConfigError, match="invalid setting REDIS_CACHE_URL: is not a valid URL"):
        load_settings(redis_url=CLAIMS, redis_cache_url="redis://cache:port/0")


def test_a_cache_url_without_redis_url_is_refused() -> None:
    """REDIS_CACHE_URL alone (no claims Redis) is refused rather than half-used."""
    with pytest.raises(ConfigError, match="REDIS_CACHE_URL needs REDIS_URL"):
        load_settings(redis_cache_url="redis://cache:6379/0")


def test_the_cache_url_password_is_a_secret() -> None:
    """A password in REDIS_CACHE_URL is among the strings never printed, and never echoed."""
    settings = load_settings(redis_url=CLAIMS, redis_cache_url="redis://:hush-cache@cache:6379/0")
    assert "hush-cache" in settings.secrets
    with pytest.raises(ConfigError) as raised:
        load_settings(redis_url=CLAIMS, redis_cache_url="http://:hush-cache@cache:6379/0")
    assert "hush-cache" not in str(raised.value)


async def test_a_cache_url_equal_to_redis_url_shares_the_claims_link() -> None:
    """Unset or equal to REDIS_URL, the cache uses the claims link; else a link of its own."""
    for cache_url in ("", CLAIMS):
        settings = load_settings(redis_url=CLAIMS, redis_cache_url=cache_url)
        claims = await claims_link(settings)
        assert not settings.cache_redis_separate
        assert await cache_link(settings, claims) is claims
        await claims.aclose()
    settings = load_settings(redis_url=CLAIMS, redis_cache_url="redis://127.0.0.1:6380/0")
    base = await build_base(settings)
    assert base.link is not None
    assert base.cache_link is not None
    assert base.cache_link is not base.link
    assert (base.link.lines, base.cache_link.lines) == (CLAIMS_LINES, CACHE_LINES)
    await base.cache_link.aclose()
    await base.link.aclose()


async def test_a_cache_url_redis_py_refuses_names_the_variable() -> None:
    """A query parameter redis-py cannot read stops start-up naming REDIS_CACHE_URL."""
    settings = load_settings(
        redis_url=CLAIMS, redis_cache_url="redis://127.0.0.1:6380/0?socket_timeout=soon"
    )
    with pytest.raises(ConfigError, match="invalid setting REDIS_CACHE_URL: Invalid value"):
        await cache_link(settings, await claims_link(settings))


def test_run_with_a_bad_cache_url_exits_2_with_one_line() -> None:
    """``run`` with a bad REDIS_CACHE_URL prints one line naming it and exits 2, no traceback."""
    env = {**os.environ, "REDIS_URL": CLAIMS, "REDIS_CACHE_URL": "memcached://cache:11211"}
    done = subprocess.run(
        [sys.executable, "-m", "worker", "run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert len(lines) == 1, lines
    assert "REDIS_CACHE_URL" in lines[0]


async def test_the_cache_link_logs_lines_of_its_own() -> None:
    """An unreachable cache Redis logs the line naming REDIS_CACHE_URL (never the contract's
    claims line) and its fallback, classification without the shared cache; the claims Redis
    logs the contract's line and says the cache stays shared."""
    unreachable = "redis://127.0.0.1:1/0"
    settings = load_settings(redis_url=unreachable, redis_cache_url="redis://127.0.0.1:1/1")
    claims = await claims_link(settings)
    cache = await cache_link(settings, claims)
    assert cache is not None
    with capture_logs() as logs:
        assert not await cache.connect()
        assert not await claims.connect()
    await cache.aclose()
    await claims.aclose()
    cache_failed, claims_failed = [entry for entry in logs if entry["log_level"] == "warning"]
    assert cache_failed["event"] == CACHE_LINES.failed
    assert cache_failed["setting"] == "REDIS_CACHE_URL"
    assert "without the shared cache" in cache_failed["fallback"]
    assert "Redis connection failed" not in cache_failed["event"]
    assert "Redis cache connected" not in CACHE_LINES.connected
    assert claims_failed["event"] == CLAIMS_LINES.failed
    assert claims_failed["fallback"] == FALLBACK_CLAIMS_ONLY


def _info_link(state: LinkState) -> RedisLink:
    fake: Any = InfoOnly()
    link = RedisLink(fake, "redis://cache:6379/0", lines=CACHE_LINES)
    link.state = state
    return link


async def test_the_cache_redis_section_has_its_figures_without_the_eviction_warning() -> None:
    """The stats' ``cache_redis`` section: the link's state and Redis's figures, no warning about
    evictions (they are what this Redis is for); ``None`` without a cache Redis of its own."""
    assert await cache_redis_section(None) is None
    section = await cache_redis_section(_info_link(LinkState.CONNECTED))
    assert section is not None
    assert section["status"] == "redis_connected"
    assert section["redis"]["maxmemory_policy"] == "volatile-lru"
    assert "warning" not in section["redis"]
    down = await cache_redis_section(_info_link(LinkState.DISCONNECTED))
    assert down == {"status": "redis_disconnected", "redis": None}


def test_the_stats_table_shows_the_cache_redis() -> None:
    """``stats`` prints the cache Redis's state, memory, policy and evictions under their name."""
    figures = {**redis_section(), "maxmemory_policy": "allkeys-lru", "evicted_keys": 321}
    stats = {
        "counters": {"processed": 1},
        "rates": {"duplicate_rate": 0.0, "cache_hit_rate": 0.0},
        "throughput": {"10s": 0.0},
        "cache_redis": {"status": "redis_connected", "redis": figures},
    }
    table = render_table(stats)
    assert "cache redis      redis_connected (REDIS_CACHE_URL)" in table
    assert "cache redis memory 2.00M" in table
    assert "policy allkeys-lru, evicted 321" in table
    assert "redis memory     " not in table, "no claims Redis figures were given"


def test_metrics_show_the_cache_redis() -> None:
    """``/metrics`` has the cache Redis's state, memory and evictions when it has one."""
    view = ReplicaView(
        identity=ReplicaIdentity.create("r-1"),
        counters=Counters(cluster=True),
        link=None,
        keys=RedisKeys("t:"),
        in_flight=lambda: 0,
        broker_connected=lambda: True,
        consuming=lambda: True,
    )
    registry = CollectorRegistry(auto_describe=False)
    collector = ReplicaCollector(view)
    registry.register(collector)
    assert b"cache_redis" not in generate_latest(registry)
    collector.cache_redis = {"status": "redis_connected", "redis": redis_section()}
    text = generate_latest(registry).decode()
    assert "neiromatrius_cache_redis_connected 1.0" in text
    assert "neiromatrius_cache_redis_maxmemory_bytes 2.68435456e+08" in text
    assert "neiromatrius_cache_redis_evicted_keys_total 4.0" in text
