"""The monitoring endpoints and the ``stats`` command against real replicas, Redis and RabbitMQ."""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis

from tests.conftest import Names
from tests.integration.proxy import CuttableProxy
from tests.integration.servers import SpareRedis, free_port
from tests.integration.support import (
    Replicas,
    ResultSink,
    body,
    publish_bodies,
    publish_raw,
    wait_counter,
)
from worker.cli.samples import generate_sample
from worker.observability.metrics import CounterName

pytestmark = pytest.mark.integration

ENDPOINTS = ("/api/monitoring/stats", "/health/live", "/health/ready", "/metrics")


async def get(port: int, path: str) -> tuple[int, bytes]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
        session.get(f"http://127.0.0.1:{port}{path}") as response,
    ):
        return response.status, await response.read()


async def get_json(port: int, path: str) -> dict[str, Any]:
    status, raw = await get(port, path)
    assert status == 200, raw
    data = orjson.loads(raw)
    assert isinstance(data, dict)
    return data


async def wait_for(port: int, path: str, status: int, timeout_s: float) -> dict[str, Any]:
    """Poll ``path`` until it answers ``status``; its JSON body."""
    deadline = time.monotonic() + timeout_s
    seen = None
    while time.monotonic() < deadline:
        seen, raw = await get(port, path)
        if seen == status:
            data = orjson.loads(raw)
            assert isinstance(data, dict)
            return data
        await asyncio.sleep(0.1)
    raise AssertionError(f"{path} still answers {seen}, not {status}, after {timeout_s}s")


def promtool_check(exposition: bytes) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is not installed (Debian: apt-get install prometheus)"
    done = subprocess.run(
        [promtool, "check", "metrics"], input=exposition, capture_output=True, timeout=30
    )
    assert done.returncode == 0, (done.stdout + done.stderr).decode()


def metric_value(exposition: bytes, name: str) -> float:
    for line in exposition.decode().splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in the exposition")


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_cluster_stats_are_the_sum_of_the_replicas(
    names: Names, redis_client: aioredis.Redis, amqp: object, tmp_path: Path
) -> None:
    """With Redis, each replica reports cache redis_connected/redis, scope cluster, counters equal to
    the sum of the three replicas' own, the live replicas with their fields, Redis memory, queue
    depths (a bad message waits in the dead-letter queue), and /metrics that passes promtool."""
    plan = generate_sample(600, 0.2, 0.5, seed=11)
    replicas = Replicas(tmp_path)
    try:
        async with ResultSink(names) as sink:
            for _ in range(3):
                replicas.start(names.env(PREFETCH="32"))
            for replica in replicas.all:
                await replica.started()
            await publish_bodies(names, [m.to_body() for m in plan.messages])
            await publish_raw(names, [(b"not json at all", "bad-1")])
            await sink.wait_for_ids({m.message_id for m in plan.messages}, timeout_s=60)
            await wait_counter(redis_client, names, CounterName.DUPLICATES, plan.duplicate_count)
            await wait_counter(redis_client, names, CounterName.DEAD_LETTERED, 1)

            ports = [r.stats_port for r in replicas.all]
            deadline = time.monotonic() + 10
            while True:  # counters outside the claim scripts reach Redis at the next heartbeat
                views = [await get_json(port, "/api/monitoring/stats") for port in ports]
                summed = {
                    name: sum(v["replica"]["counters"][name] for v in views)
                    for name in views[0]["counters"]
                }
                # Heartbeats (the live replicas' entries) are written every 0.5 s: wait for fresh ones.
                settled = (
                    all(r["in_flight"] == 0 for r in views[0]["replicas"])
                    and sum(r["processed"] for r in views[0]["replicas"]) == plan.unique_ids
                )
                if all(v["counters"] == summed for v in views) and settled:
                    break
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)

            for view in views:
                assert view["cache"] == {"status": "redis_connected", "type": "redis"}
                assert view["scope"] == "cluster"
                assert view["counters"] == summed
            counters = views[0]["counters"]
            assert counters["processed"] == plan.unique_ids
            assert counters["duplicates"] == plan.duplicate_count
            assert counters["cache_hits"] + counters["cache_misses"] == plan.unique_ids
            assert counters["dead_lettered"] == 1
            assert views[0]["rates"]["duplicate_rate"] == round(plan.duplicate_count / 600, 4)
            hits = counters["cache_hits"] / plan.unique_ids
            assert views[0]["rates"]["cache_hit_rate"] == round(hits, 4)
            assert set(views[0]["throughput"]) == {"10s", "60s", "300s"}

            live = views[0]["replicas"]
            assert {r["pid"] for r in live} == {r.pid for r in replicas.all}
            assert {r["id"] for r in live} == {v["replica"]["id"] for v in views}
            now = time.time()
            for entry in live:
                assert set(entry) == {
                    "id",
                    "host",
                    "pid",
                    "started_at",
                    "last_seen",
                    "in_flight",
                    "processed",
                }
                assert entry["started_at"] <= entry["last_seen"] <= now + 1
                assert now - entry["last_seen"] < 5
                assert entry["in_flight"] == 0
            assert sum(r["processed"] for r in live) == plan.unique_ids

            redis_memory = views[0]["redis"]
            assert redis_memory["used_memory"] > 0
            assert {"maxmemory", "maxmemory_policy", "evicted_keys"} <= redis_memory.keys()
            queues = views[0]["queues"]
            assert queues["input"] == {"name": names.input_queue, "messages": 0, "consumers": 3}
            assert queues["dead_letter"]["name"] == names.dead_letter_queue
            assert queues["dead_letter"]["messages"] == 1

            status, exposition = await get(ports[0], "/metrics")
            assert status == 200
            promtool_check(exposition)
            own = views[0]["replica"]["counters"]
            assert metric_value(exposition, "neiromatrius_processed_total") == own["processed"]
            assert (
                metric_value(exposition, "neiromatrius_processing_seconds_count")
                == (own["processed"])
            )
            assert metric_value(exposition, "neiromatrius_redis_connected") == 1.0
            assert 'neiromatrius_queue_messages{queue="dead_letter"} 1.0' in exposition.decode()
    finally:
        replicas.close()


async def test_without_redis_stats_are_per_instance(
    names: Names, amqp: object, tmp_path: Path
) -> None:
    """Without Redis the stats say cache memory/memory and scope instance, list only this replica
    with started/last-seen times, and still report the queue depths."""
    replicas = Replicas(tmp_path)
    try:
        async with ResultSink(names) as sink:
            replica = replicas.start(names.env(redis=False))
            await replica.started()
            await publish_bodies(names, [body(f"m-{i}", f"Привет {i % 5}") for i in range(20)])
            await sink.wait_for_ids({f"m-{i}" for i in range(20)}, timeout_s=30)
            stats = await get_json(replica.stats_port, "/api/monitoring/stats")
            assert stats["cache"] == {"status": "memory", "type": "memory"}
            assert stats["scope"] == "instance"
            assert stats["redis"] is None
            assert stats["counters"]["processed"] == 20
            assert stats["counters"]["cache_hits"] == 15
            (own,) = stats["replicas"]
            assert own["pid"] == replica.pid
            assert own["processed"] == 20
            assert own["started_at"] <= own["last_seen"]
            assert stats["queues"]["input"]["consumers"] == 1
            status, exposition = await get(replica.stats_port, "/metrics")
            assert status == 200
            assert metric_value(exposition, "neiromatrius_redis_configured") == 0.0
    finally:
        replicas.close()


async def test_ready_follows_the_broker(names: Names, amqp: object, tmp_path: Path) -> None:
    """/health/ready answers 503 with the reason while the broker is cut off (liveness stays 200)
    and 200 again once it is back, and the replica then processes messages again."""
    replicas = Replicas(tmp_path)
    async with CuttableProxy("127.0.0.1", 5672) as proxy, ResultSink(names) as sink:
        try:
            env = names.env(redis=False, RABBITMQ_URL=f"amqp://guest:guest@127.0.0.1:{proxy.port}/")
            replica = replicas.start(env)
            await replica.started()
            port = replica.stats_port
            ready = await wait_for(port, "/health/ready", 200, timeout_s=5)
            assert ready["status"] == "ready"

            proxy.cut()
            not_ready = await wait_for(port, "/health/ready", 503, timeout_s=15)
            assert not_ready == {"status": "not_ready", "reason": "the broker is unreachable"}
            assert (await get(port, "/health/live"))[0] == 200
            stats = await get_json(port, "/api/monitoring/stats")
            assert stats["queues"]["error"] == "the broker is unreachable"
            status, exposition = await get(port, "/metrics")
            assert status == 200
            assert metric_value(exposition, "neiromatrius_broker_connected") == 0.0

            proxy.restore()
            await wait_for(port, "/health/ready", 200, timeout_s=30)
            await publish_bodies(names, [body("after-1", "Снова на связи")])
            await sink.wait_for_ids({"after-1"}, timeout_s=30)
        finally:
            replicas.close()


async def test_no_secret_or_text_in_any_endpoint(
    names: Names, amqp: object, tmp_path: Path
) -> None:
    """With a password in REDIS_URL, no endpoint nor the stats command shows the password, the
    URL or message text, before or after Redis goes down; while down the cache is redis_disconnected."""
    password = f"pw-{uuid.uuid4().hex}"
    spare = SpareRedis(tmp_path, password=password).start()
    marker = f"Секретный текст {uuid.uuid4().hex}"
    replicas = Replicas(tmp_path)
    try:
        async with ResultSink(names) as sink:
            env = names.env(REDIS_URL=spare.url, REDIS_TIMEOUT_S="0.5")
            replica = replicas.start(env)
            await replica.started()
            await publish_bodies(names, [body(f"s-{i}", f"{marker} {i}") for i in range(10)])
            await sink.wait_for_ids({f"s-{i}" for i in range(10)}, timeout_s=30)
            port = replica.stats_port

            def assert_clean(output: bytes | str) -> None:
                text = output if isinstance(output, str) else output.decode()
                assert password not in text
                assert spare.url not in text
                assert marker.split()[-1] not in text
                assert "Секретный" not in text

            stats = await get_json(port, "/api/monitoring/stats")
            assert stats["cache"] == {"status": "redis_connected", "type": "redis"}
            for path in ENDPOINTS:
                assert_clean((await get(port, path))[1])
            for args in (("stats",), ("stats", "--json")):
                done = await asyncio.to_thread(run_cli, env, *args)
                assert done.returncode == 0, done.stderr
                assert_clean(done.stdout + done.stderr)

            spare.stop()
            deadline = time.monotonic() + 10
            while stats["cache"]["status"] != "redis_disconnected":
                assert time.monotonic() < deadline, stats["cache"]
                await asyncio.sleep(0.2)
                stats = await get_json(port, "/api/monitoring/stats")
            assert stats["cache"] == {"status": "redis_disconnected", "type": "redis"}
            assert stats["scope"] == "instance"
            for path in ENDPOINTS:
                assert_clean((await get(port, path))[1])
            done = await asyncio.to_thread(run_cli, env, "stats")
            assert done.returncode == 1
            assert "Redis connection failed" in done.stderr
            assert_clean(done.stdout + done.stderr)
    finally:
        replicas.close()
        spare.stop()


async def test_stats_command_needs_no_replica(
    names: Names, redis_client: aioredis.Redis, amqp: object, tmp_path: Path
) -> None:
    """After the only replica has stopped, ``stats`` prints the cluster table and ``--json`` from
    Redis alone (no live replica, queue depths from the broker), and still works, with the queue
    depths unknown, when the broker cannot be reached."""
    replicas = Replicas(tmp_path)
    try:
        async with ResultSink(names) as sink:
            replica = replicas.start(names.env())
            await replica.started()
            traffic = [body(f"c-{i}", f"Где заказ {i % 10}") for i in range(40)]
            await publish_bodies(names, traffic + traffic[:8])
            await sink.wait_for_ids({f"c-{i}" for i in range(40)}, timeout_s=30)
            await wait_counter(redis_client, names, CounterName.DUPLICATES, 8)
            replica.signal(signal.SIGTERM)
            assert await replica.wait_exit() == 0
    finally:
        replicas.close()

    env = names.env()
    table = await asyncio.to_thread(run_cli, env, "stats")
    assert table.returncode == 0, table.stderr
    assert "cluster stats" in table.stdout
    assert "redis_connected (redis)" in table.stdout
    assert "processed" in table.stdout
    assert "live replicas    0" in table.stdout
    assert f"{names.input_queue}: 0 waiting, 0 consumers" in table.stdout

    as_json = await asyncio.to_thread(run_cli, env, "stats", "--json")
    assert as_json.returncode == 0, as_json.stderr
    data = orjson.loads(as_json.stdout)
    assert data["cache"] == {"status": "redis_connected", "type": "redis"}
    assert data["scope"] == "cluster"
    assert data["replicas"] == []
    assert data["counters"]["processed"] == 40
    assert data["counters"]["duplicates"] == 8
    assert data["rates"]["duplicate_rate"] == round(8 / 48, 4)
    assert data["queues"]["input"] == {"name": names.input_queue, "messages": 0, "consumers": 0}

    offline = dict(env, RABBITMQ_URL=f"amqp://guest:guest@127.0.0.1:{free_port()}/")
    no_broker = await asyncio.to_thread(run_cli, offline, "stats", "--json")
    assert no_broker.returncode == 0, no_broker.stderr
    data = orjson.loads(no_broker.stdout)
    assert data["counters"]["processed"] == 40
    assert data["queues"]["error"] == "the broker is unreachable"
    assert data["queues"]["input"]["messages"] is None


async def test_evicted_keys_raise_a_warning(tmp_path: Path, names: Names) -> None:
    """When Redis has evicted keys, ``stats`` shows the eviction count and a warning that evicted
    done markers let duplicates through."""
    spare = SpareRedis(tmp_path).start()
    try:
        client = aioredis.Redis.from_url(spare.url)
        try:
            await client.config_set("maxmemory", "2mb")
            await client.config_set("maxmemory-policy", "allkeys-lru")
            blob = b"x" * 10_000
            for i in range(600):
                await client.set(f"{names.key_prefix}fill:{i}", blob)
            info = await client.info("stats")
            assert int(info["evicted_keys"]) > 0
        finally:
            await client.aclose()
        env = names.env(REDIS_URL=spare.url)
        table = await asyncio.to_thread(run_cli, env, "stats")
        assert table.returncode == 0, table.stderr
        assert "WARNING:" in table.stdout
        assert "evicted done markers let duplicates through" in table.stdout
        data = orjson.loads((await asyncio.to_thread(run_cli, env, "stats", "--json")).stdout)
        assert data["redis"]["evicted_keys"] > 0
        assert data["redis"]["maxmemory_policy"] == "allkeys-lru"
        assert "warning" in data["redis"]
    finally:
        spare.stop()
