"""Results no binding takes are kept in ``{RESULTS_EXCHANGE}.unrouted``, counted and warned about."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis

from tests.conftest import RABBITMQ_URL, Names
from tests.integration.support import (
    Replicas,
    ResultSink,
    body,
    drain_queue,
    publish_bodies,
    wait_counter,
)
from worker.observability.metrics import CounterName

pytestmark = pytest.mark.integration


async def depth(queue: str) -> int | None:
    """Messages waiting in ``queue`` (``None`` if there is no such queue), asked passively."""
    connection = await aio_pika.connect(RABBITMQ_URL)
    try:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return declared.declaration_result.message_count or 0
    except aio_pika.exceptions.ChannelNotFoundEntity:
        return None
    finally:
        await connection.close()


async def wait_depth(queue: str, count: int, timeout_s: float = 30.0) -> int | None:
    deadline = time.monotonic() + timeout_s
    while (found := await depth(queue)) != count and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    return found


async def monitoring(port: int) -> tuple[dict[str, Any], str]:
    """The replica's stats JSON and its /metrics text."""
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        async with session.get(f"{base}/api/monitoring/stats") as response:
            stats = orjson.loads(await response.read())
        async with session.get(f"{base}/metrics") as response:
            return stats, await response.text()


@pytest.mark.parametrize("fast_path", ["on", "off"])
async def test_results_with_no_binding_are_kept_counted_and_then_routed_once_bound(
    names: Names, redis_client: aioredis.Redis, amqp: object, tmp_path: Path, fast_path: str
) -> None:
    """With nobody bound to the results exchange, each of 300 results lands in the unrouted queue
    (none lost, each whole), the stats and /metrics count them, one warning says so; a queue
    bound afterwards receives the next results, and the unrouted ones stay where they are."""
    unrouted = f"{names.results_exchange}.unrouted"
    replicas = Replicas(tmp_path)
    try:
        replica = await replicas.start(names.env(AMQP_FAST_PATH=fast_path)).started()
        first = [body(f"u-{i}", f"Где мой заказ номер {i}?") for i in range(300)]
        await publish_bodies(names, first)
        await wait_counter(redis_client, names, CounterName.PROCESSED, 300, timeout_s=60)
        assert await wait_depth(unrouted, 300) == 300
        await replica.wait_for_log('"results_unrouted"', timeout_s=30)
        stats, metrics = await monitoring(replica.stats_port)
        assert stats["results_unrouted"] == 300
        assert stats["queues"]["unrouted"]["messages"] == 300
        assert "neiromatrius_results_unrouted 300.0" in metrics

        async with ResultSink(names) as sink:
            later = [body(f"b-{i}", f"Хочу вернуть товар {i}") for i in range(50)]
            await publish_bodies(names, later)
            await sink.wait_for_ids({m["message_id"] for m in later}, timeout_s=30)
            await sink.settle(quiet_s=1.0)
            assert sink.total == 50
        kept = await drain_queue(names, unrouted, 10, expected=300)
        results = [orjson.loads(m.body) for m in kept]
        assert sorted(r["message_id"] for r in results) == sorted(m["message_id"] for m in first)
        assert all(
            r["classification"]["label"] == m.routing_key
            for r, m in zip(results, kept, strict=True)
        )
        warnings = [e for e in replica.events() if e.get("event") == "results_unrouted"]
        assert len(warnings) == 1  # at most one a minute
    finally:
        replicas.close()


async def test_an_existing_results_exchange_without_an_alternate_is_used_with_a_warning(
    names: Names, redis_client: aioredis.Redis, amqp: object, tmp_path: Path
) -> None:
    """A results exchange declared before the worker, without an alternate exchange, is used as
    it is (no PRECONDITION_FAILED): results still reach a bound queue, and the replica warns
    that unrouted results are not kept, naming the policy that fixes it."""
    connection = await aio_pika.connect(RABBITMQ_URL)
    channel = await connection.channel()
    await channel.declare_exchange(names.results_exchange, "topic", durable=True)
    await connection.close()
    replicas = Replicas(tmp_path)
    try:
        replica = await replicas.start(names.env()).started()
        warning = replica.event("results_exchange_without_alternate")
        assert warning is not None
        assert "alternate-exchange" in warning["fix"]
        assert warning["found"] == "alternate-exchange=none"
        connection = await aio_pika.connect(RABBITMQ_URL)
        channel = await connection.channel()
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(names.results_exchange, routing_key="#")
        await publish_bodies(names, [body("x-1", "Где мой заказ?")])
        message = await queue.get(timeout=10, fail=False)
        deadline = time.monotonic() + 20
        while message is None and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            message = await queue.get(fail=False)
        assert message is not None
        assert orjson.loads(message.body)["message_id"] == "x-1"
        await connection.close()
    finally:
        replicas.close()


async def test_results_unrouted_discard_keeps_no_unrouted_queue(
    names: Names, redis_client: aioredis.Redis, amqp: object, tmp_path: Path
) -> None:
    """RESULTS_UNROUTED=discard: the worker creates no unrouted queue and the results no binding
    takes are dropped, as the operator asked; the stats say the count is not kept (null)."""
    replicas = Replicas(tmp_path)
    try:
        replica = await replicas.start(names.env(RESULTS_UNROUTED="discard")).started()
        await publish_bodies(names, [body("z-1", "Где мой заказ?")])
        await wait_counter(redis_client, names, CounterName.PROCESSED, 1)
        assert await depth(f"{names.results_exchange}.unrouted") is None
        stats, metrics = await monitoring(replica.stats_port)
        assert stats["results_unrouted"] is None
        assert "neiromatrius_results_unrouted" not in metrics
    finally:
        replicas.close()
