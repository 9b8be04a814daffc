"""Across three replicas, every unique message gets exactly one result and duplicates are counted."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests.conftest import Names
from tests.integration.servers import SpareRedis
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


async def test_three_replicas_process_each_id_once(
    names: Names, redis_client: aioredis.Redis, amqp: object, tmp_path: Path
) -> None:
    """3,000 unique messages plus 1,000 duplicates (700 back to back, 300 long after) give exactly
    3,000 results, one per ID, and a cluster duplicates counter of exactly 1,000."""
    rng = random.Random(7)
    uniques = [body(f"m-{i}", f"Где мой заказ номер {i}? Order #{i} status") for i in range(3000)]
    back_to_back = set(rng.sample(range(3000), 700))
    first_wave = []
    for i, message in enumerate(uniques):
        first_wave.append(message)
        if i in back_to_back:
            first_wave.append(dict(message))
    late = [dict(uniques[i]) for i in rng.sample(range(3000), 300)]

    replicas = Replicas(tmp_path)
    try:
        async with ResultSink(names) as sink:
            for _ in range(3):
                replicas.start(names.env(PREFETCH="64"))
            for replica in replicas.all:
                await replica.started()
            await publish_bodies(names, first_wave)
            await sink.wait_for_ids({m["message_id"] for m in uniques}, timeout_s=120)
            await publish_bodies(names, late)
            await wait_counter(redis_client, names, CounterName.DUPLICATES, 1000, timeout_s=60)
            await sink.settle(quiet_s=1.5)

            assert sink.total == 3000
            assert all(len(results) == 1 for results in sink.by_id.values())
            counters = await cluster_counters(redis_client, names)
            assert counters[CounterName.DUPLICATES] == 1000
            assert counters[CounterName.PROCESSED] == 3000
            # Results reach the exchange with the label as routing key and the input's ID.
            sample = sink.by_id["m-1"][0]
            assert sample["_routing_key"] == sample["classification"]["label"]
            assert sample["_amqp_message_id"] == "m-1"
            assert sample["chat_id"] == "chat-1"
    finally:
        replicas.close()


async def test_same_text_is_classified_once_for_the_cluster(
    names: Names, redis_client: aioredis.Redis, amqp: object, tmp_path: Path
) -> None:
    """One text sent under 60 IDs to three replicas is classified once; the other 59 are cache hits."""
    text = "Здравствуйте! Хочу вернуть деньги за бракованный товар"
    replicas = Replicas(tmp_path)
    try:
        async with ResultSink(names) as sink:
            for _ in range(3):
                replicas.start(names.env())
            for replica in replicas.all:
                await replica.started()
            await publish_bodies(names, [body("first", text)])
            await sink.wait_for_ids({"first"}, timeout_s=30)
            rest = [body(f"copy-{i}", f"  {text} " if i % 2 else text) for i in range(59)]
            await publish_bodies(names, rest)
            await sink.wait_for_ids({m["message_id"] for m in rest}, timeout_s=30)

            counters = await wait_counter(redis_client, names, CounterName.CACHE_HITS, 59)
            assert counters[CounterName.CACHE_MISSES] == 1
            assert counters[CounterName.CACHE_HITS] == 59
            await wait_counter(redis_client, names, CounterName.CLASSIFIER_CALLS, 1)
            await asyncio.sleep(1.5)  # three heartbeats: every replica has flushed its calls
            counters = await cluster_counters(redis_client, names)
            assert counters[CounterName.CLASSIFIER_CALLS] == 1
            assert not sink.by_id["first"][0]["classification"]["cached"]
            assert all(sink.by_id[m["message_id"]][0]["classification"]["cached"] for m in rest)
    finally:
        replicas.close()


async def test_a_copy_arriving_while_its_original_is_in_work_costs_no_second_claim(
    names: Names, amqp: object, tmp_path: Path
) -> None:
    """Each of 40 messages is sent twice back to back, and the classification takes 300 ms, so
    nearly every copy arrives while its original is in work in the one replica. Such a copy is
    settled as a duplicate once that work is done, without asking Redis: the claim script (the
    worker's only EXISTS) runs for about 40 IDs, not 80. (A copy parsed only after its original's
    pass has ended is claimed, and found done: the order in which two passes end allows a few.)"""
    spare = SpareRedis(tmp_path).start()
    client = aioredis.Redis.from_url(spare.url)
    replicas = Replicas(tmp_path)
    try:
        originals = [body(f"c-{i}", f"Где мой заказ номер {i}?") for i in range(40)]
        twice = [copy for message in originals for copy in (message, dict(message))]
        async with ResultSink(names) as sink:
            env = names.env(CLASSIFIER_DELAY_MS="300", PREFETCH="200")
            env["REDIS_URL"] = spare.url
            await replicas.start(env).started()
            await publish_bodies(names, twice)
            await sink.wait_for_ids({m["message_id"] for m in originals}, timeout_s=60)
            counters = await wait_counter(client, names, CounterName.DUPLICATES, 40, timeout_s=30)
            assert counters[CounterName.PROCESSED] == 40
            claimed = (await client.info("commandstats"))["cmdstat_exists"]["calls"]
            assert 40 <= claimed <= 44
            assert sink.total == 40
    finally:
        replicas.close()
        await client.aclose()
        spare.stop()
