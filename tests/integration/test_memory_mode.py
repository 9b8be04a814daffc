"""Without Redis, and with a Redis that is unreachable for a while."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests.conftest import Names
from tests.integration.servers import SpareRedis, free_port
from tests.integration.support import Replicas, ResultSink, body, cluster_counters, publish_bodies
from worker.redisio.link import CONNECTED_LINE, FAILED_LINE
from worker.redisio.roles import IN_MEMORY_LINE

pytestmark = pytest.mark.integration


def get_json(port: int, path: str) -> dict[str, object]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        return dict(json.loads(response.read()))


async def test_without_redis_one_replica_skips_duplicates(
    names: Names, amqp: object, tmp_path: Path
) -> None:
    """No REDIS_URL: one replica processes every unique message once, skips duplicates, says it
    runs in memory once, and reports cache type and status ``memory`` with scope ``instance``."""
    uniques = [body(f"u-{i}", f"Хочу купить товар {i % 40}") for i in range(400)]
    traffic = uniques + uniques[:100] + uniques[200:250]
    replicas = Replicas(tmp_path)
    try:
        async with ResultSink(names) as sink:
            replica = replicas.start(names.env(redis=False))
            await replica.started()
            await publish_bodies(names, traffic)
            await sink.wait_for_ids({m["message_id"] for m in uniques}, timeout_s=30)
            await sink.settle(quiet_s=1.0)
            assert sink.total == 400
            stats = await asyncio.to_thread(get_json, replica.stats_port, "/api/monitoring/stats")
            assert stats["cache"] == {"status": "memory", "type": "memory"}
            assert stats["scope"] == "instance"
            counters = stats["counters"]
            assert isinstance(counters, dict)
            assert counters["processed"] == 400
            assert counters["duplicates"] == 150
            assert counters["cache_misses"] == 40
            assert replica.log_text().count(IN_MEMORY_LINE) == 1
    finally:
        replicas.close()


async def test_unreachable_redis_falls_back_and_recovers(
    names: Names, amqp: object, tmp_path: Path
) -> None:
    """With a configured Redis that is down, the replica logs the failure line, keeps processing in
    memory, logs the connected line once Redis is reachable, and then uses Redis again."""
    port = free_port()
    spare = SpareRedis(tmp_path, port)
    replicas = Replicas(tmp_path)
    try:
        async with ResultSink(names) as sink:
            env = names.env(REDIS_URL=f"redis://127.0.0.1:{port}/0", REDIS_TIMEOUT_S="0.5")
            replica = replicas.start(env)
            await replica.started()
            await replica.wait_for_log(FAILED_LINE)
            assert CONNECTED_LINE not in replica.log_text()
            stats = await asyncio.to_thread(get_json, replica.stats_port, "/api/monitoring/stats")
            assert stats["cache"] == {"status": "redis_disconnected", "type": "redis"}

            offline = [body(f"off-{i}", f"Привет {i}") for i in range(50)]
            await publish_bodies(names, offline)
            await sink.wait_for_ids({m["message_id"] for m in offline}, timeout_s=30)

            spare.start()
            await replica.wait_for_log(CONNECTED_LINE, timeout_s=30)
            online = [body(f"on-{i}", f"Спасибо {i}") for i in range(50)]
            await publish_bodies(names, online + offline[:10])
            await sink.wait_for_ids({m["message_id"] for m in online}, timeout_s=30)
            await sink.settle(quiet_s=1.0)

            assert sink.total == 100  # the re-sent offline IDs were recognised as done
            client = aioredis.Redis.from_url(spare.url)
            try:
                assert await client.exists(names.keys.done("on-0"))
                # IDs finished during the outage were written back when Redis returned.
                assert await client.exists(names.keys.done("off-0"))
                counters = await cluster_counters(client, names)
                assert counters["processed"] == 100
            finally:
                await client.aclose()
            stats = await asyncio.to_thread(get_json, replica.stats_port, "/api/monitoring/stats")
            assert stats["cache"] == {"status": "redis_connected", "type": "redis"}
    finally:
        replicas.close()
        spare.stop()
