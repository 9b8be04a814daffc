"""The Redis figures the source document watches (memory, connections, commands per second) in the
stats document, the ``stats`` table and ``/metrics``."""

from __future__ import annotations

import re
import shutil
import subprocess
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest

from worker.observability.counters import Counters, ReplicaIdentity
from worker.observability.http import ReplicaCollector, ReplicaView
from worker.observability.stats import read_redis_memory
from worker.observability.table import render_table
from worker.redisio.keys import RedisKeys

INFO: dict[str, dict[str, Any]] = {
    "memory": {
        "used_memory": 2_097_152,
        "used_memory_human": "2.00M",
        "maxmemory": 268_435_456,
        "maxmemory_policy": "volatile-lru",
    },
    "clients": {"connected_clients": 7, "blocked_clients": 0},
    "stats": {"evicted_keys": 0, "instantaneous_ops_per_sec": 1234},
}


class InfoOnly:
    """Answers ``INFO section`` as a Redis server would (redis-py's parsed form)."""

    async def info(self, section: str) -> dict[str, Any]:
        return INFO[section]


def redis_section() -> dict[str, Any]:
    return {
        "used_memory": 2_097_152,
        "used_memory_human": "2.00M",
        "maxmemory": 268_435_456,
        "maxmemory_policy": "volatile-lru",
        "evicted_keys": 4,
        "connected_clients": 7,
        "instantaneous_ops_per_sec": 1234,
    }


async def test_the_redis_section_has_connections_and_commands_per_second() -> None:
    """The stats' ``redis`` section reads connected_clients (INFO clients) and
    instantaneous_ops_per_sec (INFO stats) next to the memory figures."""
    section = await read_redis_memory(InfoOnly())  # type: ignore[arg-type]
    assert section["connected_clients"] == 7
    assert section["instantaneous_ops_per_sec"] == 1234
    assert section["used_memory"] == 2_097_152
    assert section["maxmemory"] == 268_435_456


def test_the_stats_table_shows_connections_and_commands_per_second() -> None:
    """``stats`` prints the Redis connections and commands per second on a line of their own."""
    stats = {
        "scope": "cluster",
        "counters": {"processed": 1},
        "rates": {"duplicate_rate": 0.0, "cache_hit_rate": 0.0},
        "throughput": {"10s": 0.0},
        "replicas": [],
        "redis": redis_section(),
    }
    lines = render_table(stats, now=0.0).splitlines()
    assert "  redis clients    7 connected, 1,234 commands/s" in lines


def exposition(redis: dict[str, Any] | None) -> str:
    view = ReplicaView(
        identity=ReplicaIdentity.create("unit-replica"),
        counters=Counters(cluster=False),
        link=None,
        keys=RedisKeys("unit:"),
        in_flight=lambda: 0,
        broker_connected=lambda: True,
        consuming=lambda: True,
    )
    collector = ReplicaCollector(view)
    collector.redis = redis
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return generate_latest(registry).decode()


def samples(text: str) -> dict[str, float]:
    """The Redis figures of an exposition (the configured/connected state gauges left out)."""
    found = re.findall(r"^(neiromatrius_redis_\w+) (\S+)$", text, re.MULTILINE)
    state = {"neiromatrius_redis_configured", "neiromatrius_redis_connected"}
    return {name: float(value) for name, value in found if name not in state}


def test_metrics_expose_the_redis_figures_as_gauges() -> None:
    """/metrics has neiromatrius_redis_connected_clients and neiromatrius_redis_ops_per_second
    as gauges (the dashboard's names), with memory, maxmemory and evictions, when Redis answers."""
    text = exposition(redis_section())
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE))
    assert types["neiromatrius_redis_connected_clients"] == "gauge"
    assert types["neiromatrius_redis_ops_per_second"] == "gauge"
    assert types["neiromatrius_redis_used_memory_bytes"] == "gauge"
    assert types["neiromatrius_redis_maxmemory_bytes"] == "gauge"
    assert types["neiromatrius_redis_evicted_keys_total"] == "counter"
    assert samples(text) == {
        "neiromatrius_redis_used_memory_bytes": 2_097_152.0,
        "neiromatrius_redis_maxmemory_bytes": 268_435_456.0,
        "neiromatrius_redis_connected_clients": 7.0,
        "neiromatrius_redis_ops_per_second": 1234.0,
        "neiromatrius_redis_evicted_keys_total": 4.0,
    }
    promtool = shutil.which("promtool")
    if promtool:
        done = subprocess.run(
            [promtool, "check", "metrics"], input=text.encode(), capture_output=True
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.strip() == b""


def test_metrics_without_redis_have_no_redis_figures() -> None:
    """Without a reachable Redis (or in memory mode) no Redis figure is exported: no stale zero."""
    assert samples(exposition(None)) == {}
