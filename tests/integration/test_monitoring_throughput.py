"""Throughput figures against a load published at a known rate."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis

from tests.conftest import RABBITMQ_URL, Names
from tests.integration.support import Replicas, body
from worker.cli import publish

pytestmark = pytest.mark.integration

RATE_PER_S = 150
PUBLISH_S = 14
READ_AT_S = 12.5  # the 10 s window then covers seconds 2..12 of a steady load


async def test_cluster_throughput_matches_the_published_rate(
    names: Names, redis_client: aioredis.Redis, amqp: object, tmp_path: Path
) -> None:
    """Publishing at 150 messages/s to two replicas, the cluster's 10 s throughput is within 10 %
    of 150/s, and the 60 s and 5 min figures count the same messages over their longer windows."""
    traffic = [body(f"t-{i}", f"Сообщение {i}") for i in range(RATE_PER_S * PUBLISH_S)]
    replicas = Replicas(tmp_path)
    try:
        for _ in range(2):
            replicas.start(names.env())
        for replica in replicas.all:
            await replica.started()
        port = replicas.all[0].stats_port
        started = time.monotonic()
        publishing = asyncio.get_running_loop().create_task(
            publish.publish(
                RABBITMQ_URL,
                names.input_queue,
                publish.from_bodies(traffic),
                rate_per_s=RATE_PER_S,
            )
        )
        await asyncio.sleep(READ_AT_S - (time.monotonic() - started))
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/api/monitoring/stats") as response,
        ):
            stats = orjson.loads(await response.read())
        await publishing

        assert stats["scope"] == "cluster"
        throughput = stats["throughput"]
        assert abs(throughput["10s"] - RATE_PER_S) <= 0.1 * RATE_PER_S, throughput
        # Every message so far is inside both longer windows, so they count the same messages.
        counted = throughput["60s"] * 60
        assert abs(counted - throughput["300s"] * 300) <= 2, throughput
        assert abs(counted - RATE_PER_S * READ_AT_S) <= 0.1 * RATE_PER_S * READ_AT_S, throughput
    finally:
        replicas.close()
