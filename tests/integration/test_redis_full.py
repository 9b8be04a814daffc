"""A noeviction Redis filled to its maxmemory: claims pause (nothing falls back to memory, nothing is
requeued in a loop), readiness answers 503, and the replicas resume by themselves once memory is
freed, with every message published once."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.exceptions import OutOfMemoryError

from tests.conftest import Names
from tests.integration.servers import SpareRedis
from tests.integration.support import Replicas, ResultSink, body, publish_bodies
from worker.redisio.link import NOT_WRITABLE_LINE

pytestmark = pytest.mark.integration

MAXMEMORY = "16mb"
FILLER_BYTES = 50_000


def http_get(port: int, path: str) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, dict(json.loads(response.read()))
    except urllib.error.HTTPError as error:
        return error.code, dict(json.loads(error.read()))


def messages(prefix: str, count: int) -> list[dict[str, object]]:
    return [body(f"{prefix}-{i}", f"Где мой заказ {prefix} {i}?") for i in range(count)]


async def keep_full(client: aioredis.Redis, full: asyncio.Event, stop: asyncio.Event) -> None:
    """Write filler keys (the test's own) until Redis refuses even a small one, large ones first,
    and go on taking whatever room Redis frees (buffers it shrinks) until ``stop``."""
    written = 0
    for size in (FILLER_BYTES, 1_000):
        while True:
            try:
                await client.set(f"filler:{written}", b"x" * size)
            except OutOfMemoryError:
                break
            written += 1
    full.set()
    while not stop.is_set():
        try:
            await client.set(f"filler:{written}", b"x" * 16)
            written += 1
        except OutOfMemoryError:
            await asyncio.sleep(0.005)


async def wait_until_status(port: int, status: int, timeout_s: float) -> float:
    """Seconds until ``/health/ready`` answers ``status`` (fails after ``timeout_s``)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        got, _ = await asyncio.to_thread(http_get, port, "/health/ready")
        if got == status:
            return time.monotonic() - started
        await asyncio.sleep(0.05)
    raise AssertionError(f"readiness did not answer {status} within {timeout_s} s")


async def test_a_full_noeviction_redis_pauses_claims_and_resumes_by_itself(
    names: Names, amqp: object, tmp_path: Path
) -> None:
    """Redis full under noeviction while two replicas work: within 2 s readiness is 503 and
    nothing more is published; at most one warning per replica; both stay listed in the stats;
    after the filler is deleted every message is published, at most 0.1 % of them twice."""
    spare = SpareRedis(tmp_path).start()
    admin = aioredis.Redis(port=spare.port)
    await admin.config_set("maxmemory", MAXMEMORY)
    await admin.config_set("maxmemory-policy", "noeviction")
    replicas = Replicas(tmp_path)
    try:
        async with ResultSink(names) as sink:
            env = names.env(REDIS_URL=spare.url, CLASSIFIER_DELAY_MS="5")
            group = [replicas.start(env, name=f"r{i}") for i in range(2)]
            await replicas.started()
            before = messages("before", 300)
            await publish_bodies(names, before)
            await sink.wait_for_ids({m["message_id"] for m in before}, timeout_s=30)

            full, stop_filling = asyncio.Event(), asyncio.Event()
            filler = asyncio.create_task(keep_full(admin, full, stop_filling))
            await full.wait()
            for replica in group:  # a claim or a heartbeat finds Redis full within 2 s
                assert await wait_until_status(replica.stats_port, 503, timeout_s=2.0) <= 2.0
            _, ready = await asyncio.to_thread(http_get, group[0].stats_port, "/health/ready")
            assert "OOM" in str(ready["reason"])
            during = messages("during", 1000)
            await publish_bodies(names, during)
            published_before = sink.total
            await asyncio.sleep(3.0)
            # A Redis at its limit frees a little now and then (it shrinks buffers) and takes a
            # write or two before the filler does: such a claim is a real one, its message is
            # processed once. Anything more would be claims going on regardless.
            assert sink.total - published_before <= 0.01 * len(during)
            _, stats = await asyncio.to_thread(
                http_get, group[0].stats_port, "/api/monitoring/stats"
            )
            assert len(stats["replicas"]) == 2  # type: ignore[arg-type]

            stop_filling.set()
            await filler
            keys = [key async for key in admin.scan_iter("filler:*", count=1000)]
            for start in range(0, len(keys), 500):
                await admin.delete(*keys[start : start + 500])
            for replica in group:
                await wait_until_status(replica.stats_port, 200, timeout_s=10.0)
            await sink.wait_for_ids({m["message_id"] for m in during}, timeout_s=60)
            await sink.settle(quiet_s=1.5)

        twice = [i for i, results in sink.by_id.items() if len(results) > 1]
        print(f"full noeviction Redis: {len(twice)} of {len(sink.by_id)} published twice")
        assert len(sink.by_id) == len(before) + len(during)  # nothing lost
        assert len(twice) <= 0.001 * len(sink.by_id), twice
        for replica in group:
            log = replica.log_text()
            assert log.count(NOT_WRITABLE_LINE) <= 1
            assert "Traceback" not in log
            assert "claims_in_memory" not in log  # never a fall back to memory
    finally:
        replicas.close()
        await admin.aclose()
        spare.stop()
