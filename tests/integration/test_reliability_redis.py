"""Redis stopped for ten seconds mid-run: by default the replica keeps processing on its in-memory
fallback and comes back to Redis; with REDIS_FAILURE_MODE=strict it processes nothing meanwhile
and loses nothing."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests.conftest import Names
from tests.integration.servers import SpareRedis
from tests.integration.support import Replicas, ResultSink, body, cluster_counters, publish_bodies
from worker.observability.metrics import CounterName
from worker.redisio.link import CONNECTED_LINE, FAILED_LINE

pytestmark = pytest.mark.integration

OUTAGE_S = 10.0


def http_get(port: int, path: str) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, dict(json.loads(response.read()))
    except urllib.error.HTTPError as error:
        return error.code, dict(json.loads(error.read()))


async def stats_of(spare: SpareRedis, names: Names) -> dict[str, int]:
    client = aioredis.Redis.from_url(spare.url)
    try:
        counters = await cluster_counters(client, names)
    finally:
        await client.aclose()
    return {name: n for name, n in counters.items() if n}


def batch(prefix: str, count: int) -> list[dict[str, object]]:
    return [body(f"{prefix}-{i}", f"Где мой заказ {prefix} {i}?") for i in range(count)]


async def wait_for_claims(spare: SpareRedis, names: Names, count: int) -> None:
    """Wait until ``count`` claims are held in ``spare`` (the messages are in work)."""
    client = aioredis.Redis.from_url(spare.url)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            held = [k async for k in client.scan_iter(names.keys.claim_pattern, count=1000)]
            if len(held) >= count:
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"fewer than {count} claims held after 20 s")
    finally:
        await client.aclose()


async def wait_until(condition: object, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if callable(condition) and condition():
            return True
        await asyncio.sleep(0.05)
    return False


async def test_default_mode_keeps_processing_through_a_redis_outage(
    names: Names, amqp: object, tmp_path: Path
) -> None:
    """Redis down for ten seconds: the replica logs the failure line, waits a few seconds, then
    processes new messages in memory (counted as degraded) while Redis is still down, logs the
    connected line when it is back, writes back what it finished, and counts everything once."""
    spare = SpareRedis(tmp_path, appendonly=True).start()
    replicas = Replicas(tmp_path)
    try:
        async with ResultSink(names) as sink:
            replica = replicas.start(
                names.env(REDIS_URL=spare.url, REDIS_TIMEOUT_S="0.5", CLASSIFIER_DELAY_MS="50")
            )
            await replica.started()
            before = batch("before", 40)
            await publish_bodies(names, before)
            await sink.wait_for_ids({m["message_id"] for m in before}, timeout_s=30)

            spare.stop()
            stopped_at = time.monotonic()
            during = batch("during", 40)
            await publish_bodies(names, during)
            await sink.wait_for_ids({m["message_id"] for m in during}, timeout_s=OUTAGE_S - 2)
            assert time.monotonic() - stopped_at < OUTAGE_S  # processed while Redis was down
            await replica.wait_for_log(FAILED_LINE)
            await replica.wait_for_log("consumer_paused")  # the first seconds: waiting for Redis
            await replica.wait_for_log("claims_in_memory")
            port = replica.stats_port
            _, stats = await asyncio.to_thread(http_get, port, "/api/monitoring/stats")
            assert stats["cache"] == {"status": "redis_disconnected", "type": "redis"}
            own = stats["replica"]
            assert isinstance(own, dict)
            assert own["counters"][CounterName.DEGRADED] >= len(during)

            await asyncio.sleep(max(0.0, OUTAGE_S - (time.monotonic() - stopped_at)))
            spare.start()
            await replica.wait_for_log('"recovered":true', timeout_s=15)
            after = batch("after", 40)
            await publish_bodies(names, after + during[:10])  # re-sent: recognised as done
            await sink.wait_for_ids({m["message_id"] for m in after}, timeout_s=30)
            await sink.settle(quiet_s=1.0)

            assert sink.total == 120
            assert all(len(results) == 1 for results in sink.by_id.values())
            assert CONNECTED_LINE in replica.log_text()
            counters = await stats_of(spare, names)
            for _ in range(40):  # the pending counts are flushed at the next heartbeat
                if counters.get(CounterName.PROCESSED) == 120:
                    break
                await asyncio.sleep(0.1)
                counters = await stats_of(spare, names)
            assert counters[CounterName.PROCESSED] == 120
            assert counters[CounterName.DEGRADED] >= len(during)
            assert counters[CounterName.DUPLICATES] == 10
            _, stats = await asyncio.to_thread(http_get, port, "/api/monitoring/stats")
            assert stats["cache"] == {"status": "redis_connected", "type": "redis"}
    finally:
        replicas.close()
        spare.stop()


async def test_strict_mode_processes_nothing_during_a_redis_outage_and_loses_nothing(
    names: Names, amqp: object, tmp_path: Path
) -> None:
    """REDIS_FAILURE_MODE=strict, Redis down for ten seconds while messages are in work: no
    message published during the outage gets a result before Redis is back (the replica holds
    them unacknowledged, readiness 503), and afterwards every message (ten of them sent twice)
    has exactly one result and is counted once."""
    spare = SpareRedis(tmp_path, appendonly=True).start()
    replicas = Replicas(tmp_path)
    try:
        async with ResultSink(names) as sink:
            replica = replicas.start(
                names.env(
                    REDIS_URL=spare.url,
                    REDIS_TIMEOUT_S="0.5",
                    REDIS_FAILURE_MODE="strict",
                    CLASSIFIER_DELAY_MS="1000",
                    PREFETCH="30",
                )
            )
            await replica.started()
            port = replica.stats_port
            before = batch("before", 10)
            await publish_bodies(names, before)
            await wait_for_claims(spare, names, 3)

            spare.stop()  # with messages in work
            stopped_at = time.monotonic()
            during = batch("during", 30)
            await publish_bodies(names, during + during[:10])
            assert await wait_until(lambda: http_get(port, "/health/ready")[0] == 503, OUTAGE_S - 2)
            await asyncio.sleep(max(0.0, OUTAGE_S - (time.monotonic() - stopped_at)))
            during_ids = {m["message_id"] for m in during}
            assert not during_ids & sink.by_id.keys()  # nothing processed while Redis was down
            await replica.wait_for_log(FAILED_LINE)
            assert "REDIS_FAILURE_MODE=strict" in replica.log_text()

            spare.start()
            await sink.wait_for_ids(during_ids | {m["message_id"] for m in before}, 60)
            await sink.settle(quiet_s=1.0)

            assert sink.total == 40
            assert all(len(results) == 1 for results in sink.by_id.values())
            await replica.wait_for_log('"recovered":true')
            assert (await asyncio.to_thread(http_get, port, "/health/ready"))[0] == 200
            counters = await stats_of(spare, names)
            assert counters[CounterName.PROCESSED] == 40
            assert counters.get(CounterName.DEGRADED, 0) == 0
    finally:
        replicas.close()
        spare.stop()
