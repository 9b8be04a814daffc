"""SIGTERM under load: the replica drains, exits 0, and nothing is lost."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests.conftest import Names
from tests.integration.support import (
    Replicas,
    ResultSink,
    body,
    cluster_counters,
    publish_bodies,
)
from worker.observability.metrics import CounterName

pytestmark = pytest.mark.integration

DRAIN_TIMEOUT_S = 10


async def test_sigterm_under_load_drains_and_loses_nothing(
    names: Names, redis_client: aioredis.Redis, amqp: object, tmp_path: Path
) -> None:
    """One of three replicas gets SIGTERM mid-load: it exits 0 within the drain timeout, and every
    message still gets exactly one result (its unacknowledged ones go to the others)."""
    messages = [body(f"t-{i}", f"Какая цена доставки {i}?") for i in range(1500)]
    env = names.env(CLASSIFIER_DELAY_MS="20", PREFETCH="50", DRAIN_TIMEOUT_S=str(DRAIN_TIMEOUT_S))
    replicas = Replicas(tmp_path)
    try:
        async with ResultSink(names) as sink:
            for _ in range(3):
                replicas.start(env)
            for replica in replicas.all:
                await replica.started()
            await publish_bodies(names, messages)
            while sink.total < 300:
                await asyncio.sleep(0.05)
            leaving = replicas.all[0]
            leaving.signal(signal.SIGTERM)
            asked_at = time.monotonic()
            assert await leaving.wait_exit(timeout_s=DRAIN_TIMEOUT_S + 5) == 0
            assert time.monotonic() - asked_at < DRAIN_TIMEOUT_S + 2
            await leaving.wait_for_log("replica_stopped")
            assert '"drained":true' in leaving.log_text()

            await sink.wait_for_ids({m["message_id"] for m in messages}, timeout_s=60)
            await sink.settle(quiet_s=1.0)
            assert sink.total == len(messages)
            counters = await cluster_counters(redis_client, names)
            assert counters[CounterName.PROCESSED] == len(messages)
    finally:
        replicas.close()
