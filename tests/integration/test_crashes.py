"""Replicas that die: nothing is lost, nothing finished is processed or counted twice."""

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
    wait_counter,
)
from worker.observability.metrics import CounterName

pytestmark = pytest.mark.integration

LEASE_S = 2.0


async def test_sigkill_while_holding_claims_loses_nothing(
    names: Names, redis_client: aioredis.Redis, amqp: object, tmp_path: Path
) -> None:
    """A replica SIGKILLed while it holds claims: every message still gets its result, and the
    others take its messages over within about one lease."""
    messages = [body(f"k-{i}", f"Когда придёт мой заказ {i}?") for i in range(120)]
    common = {"CLAIM_LEASE_S": str(LEASE_S), "CLASSIFIER_DELAY_MS": "400", "PREFETCH": "20"}
    replicas = Replicas(tmp_path)
    try:
        async with ResultSink(names) as sink:
            victim = replicas.start(names.env(REPLICA_ID="victim", **common))
            await victim.started()
            await publish_bodies(names, messages)
            # The victim alone holds claims now (prefetch 20, 400 ms each).
            deadline = time.monotonic() + 10
            held = []
            while time.monotonic() < deadline and not held:
                held = [
                    k
                    async for k in redis_client.scan_iter(
                        match=names.keys.claim_pattern, count=1000
                    )
                ]
                await asyncio.sleep(0.05)
            assert held, "the victim never held a claim"
            survivors = [replicas.start(names.env(**common)) for _ in range(2)]
            for replica in survivors:
                await replica.started()
            # What it holds at the kill bounds what it can have published without marking done:
            # a claim taken after this scan cannot have its result out (400 ms of work) before the
            # kill a few milliseconds later.
            held = [
                k async for k in redis_client.scan_iter(match=names.keys.claim_pattern, count=1000)
            ]
            victim.signal(signal.SIGKILL)
            killed_at = time.monotonic()
            await victim.wait_exit()

            await sink.wait_for_ids({m["message_id"] for m in messages}, timeout_s=60)
            await sink.settle(quiet_s=1.0)
            # Its claims were taken over once they expired: within about one lease of the kill,
            # plus the time to work through what is left.
            taken_over = [
                k async for k in redis_client.scan_iter(match=names.keys.claim_pattern, count=1000)
            ]
            assert taken_over == []
            assert time.monotonic() - killed_at < 60
            counters = await cluster_counters(redis_client, names)
            assert counters[CounterName.PROCESSED] == len(messages)
            # Only a message the victim had published but not yet marked done can be published
            # twice; everything else exactly once.
            assert sum(len(r) for r in sink.by_id.values()) - len(messages) <= len(held)
    finally:
        replicas.close()


async def test_sigkill_takeover_happens_within_about_one_lease(
    names: Names, redis_client: aioredis.Redis, amqp: object, tmp_path: Path
) -> None:
    """A message whose owner dies mid-work is finished by another replica about one lease later."""
    replicas = Replicas(tmp_path)
    try:
        async with ResultSink(names) as sink:
            victim = replicas.start(
                names.env(CLAIM_LEASE_S=str(LEASE_S), CLASSIFIER_DELAY_MS="30000", PREFETCH="1")
            )
            await victim.started()
            await publish_bodies(names, [body("slow-1", "Хочу оформить заказ")])
            key = names.keys.claim("slow-1")
            deadline = time.monotonic() + 10
            while not await redis_client.exists(key) and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert await redis_client.exists(key)
            survivor = replicas.start(names.env(CLAIM_LEASE_S=str(LEASE_S)))
            await survivor.started()
            victim.signal(signal.SIGKILL)
            killed_at = time.monotonic()
            await sink.wait_for_ids({"slow-1"}, timeout_s=30)
            elapsed = time.monotonic() - killed_at
            # The survivor got the redelivery at once, found the lease held, and waited it out.
            assert elapsed < LEASE_S + 1.5
            assert len(sink.by_id["slow-1"]) == 1
    finally:
        replicas.close()


async def test_crash_after_complete_before_ack_counts_nothing_twice(
    names: Names, redis_client: aioredis.Redis, amqp: object, tmp_path: Path
) -> None:
    """A replica that dies after marking a message done but before acknowledging it: the redelivery
    is acknowledged without reprocessing and without counting anything twice."""
    replicas = Replicas(tmp_path)
    try:
        async with ResultSink(names) as sink:
            crasher = replicas.start(names.env(FAULT_INJECTION="kill_after_complete:crash-"))
            await crasher.started()
            await publish_bodies(names, [body("crash-1", "Привет! Как дела?")])
            assert await crasher.wait_exit(timeout_s=20) == -signal.SIGKILL
            assert await redis_client.exists(names.keys.done("crash-1"))

            healthy = replicas.start(names.env())
            await healthy.started()
            counters = await wait_counter(redis_client, names, CounterName.REDELIVERED_DONE, 1)
            await sink.settle(quiet_s=1.0)

            assert len(sink.by_id["crash-1"]) == 1
            assert counters[CounterName.PROCESSED] == 1
            assert counters[CounterName.CACHE_MISSES] == 1
            assert counters[CounterName.DUPLICATES] == 0
            assert counters[CounterName.REDELIVERED_DONE] == 1
    finally:
        replicas.close()
