"""RabbitMQ going away mid-run: replicas report it, reconnect, and the claims keep the deliveries
redelivered meanwhile from being processed twice."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import pytest
import redis.asyncio as aioredis

from tests.conftest import RABBITMQ_URL, Names
from tests.integration.proxy import CuttableProxy
from tests.integration.support import (
    Replica,
    Replicas,
    ResultSink,
    body,
    broker_connections,
    close_broker_connections,
    cluster_counters,
    publish_bodies,
    rabbitmqctl_usable,
    wait_counter,
)
from worker.amqp.broker import CONNECTION_NAME
from worker.claims.protocol import ClaimAsk, ClaimStatus, CompleteStatus, Completion, TokenSource
from worker.claims.redis_store import RedisClaimStore
from worker.observability.metrics import CounterName
from worker.redisio.keys import RedisKeys

pytestmark = pytest.mark.integration

UNCONFIRMED = "publish of a result failed"


def ready_status(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=5) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except OSError:
        return 0


async def wait_ready(replicas: list[Replica], status: int, timeout_s: float) -> None:
    ports = [replica.stats_port for replica in replicas]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        seen = [await asyncio.to_thread(ready_status, port) for port in ports]
        if all(s == status for s in seen):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"readiness did not become {status} within {timeout_s}s")


def own_stats(port: int) -> dict[str, Any]:
    """The replica's own part of its stats document: its counters and the deliveries in hand."""
    url = f"http://127.0.0.1:{port}/api/monitoring/stats"
    with urllib.request.urlopen(url, timeout=5) as reply:
        own: dict[str, Any] = json.loads(reply.read())["replica"]
    return own


async def wait_own(
    replica: Replica, holds: Callable[[dict[str, Any]], bool], what: str, timeout_s: float = 30
) -> dict[str, Any]:
    """Poll the replica's own stats until ``holds`` is true of them; those stats."""
    deadline = time.monotonic() + timeout_s
    while not holds(own := await asyncio.to_thread(own_stats, replica.stats_port)):
        assert time.monotonic() < deadline, f"{what} did not happen in {timeout_s}s: {own}"
        await asyncio.sleep(0.05)
    return own


async def wait_results(sink: ResultSink, count: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while sink.total < count:
        assert time.monotonic() < deadline, f"{sink.total} of {count} results in {timeout_s}s"
        await asyncio.sleep(0.02)


async def ready_messages(connection: aio_pika.abc.AbstractRobustConnection, queue: str) -> int:
    """Messages waiting in ``queue`` for a consumer (not those delivered, unacknowledged)."""
    channel = await connection.channel()
    try:
        declared = await channel.declare_queue(queue, passive=True)
        return int(declared.declaration_result.message_count or 0)
    finally:
        await channel.close()


def unconfirmed_results(replicas: list[Replica]) -> set[str]:
    """IDs whose result publish was in flight, unconfirmed, when a connection dropped."""
    return {
        str(event["message_id"])
        for replica in replicas
        for event in replica.events()
        if UNCONFIRMED in str(event.get("error", "")) and "message_id" in event
    }


async def test_broker_outage_reconnects_and_processes_nothing_twice(
    names: Names, redis_client: aioredis.Redis, amqp: object, tmp_path: Path
) -> None:
    """Two replicas cut off from the broker for five seconds mid-run report not ready, come back
    on their own, and every message gets a result; the deliveries they held were redelivered and
    recognised by their claims, so each message is counted once and none as a duplicate, and a
    result is published twice only where its publish was in flight, unconfirmed, at the cut."""
    messages = [body(f"b-{i}", f"Оплата заказа номер {i}") for i in range(400)]
    upstream = urlsplit(RABBITMQ_URL)
    replicas = Replicas(tmp_path)
    async with (
        CuttableProxy(upstream.hostname or "127.0.0.1", upstream.port or 5672) as proxy,
        ResultSink(names) as sink,
    ):
        try:
            via_proxy = RABBITMQ_URL.replace(
                upstream.netloc.split("@")[-1], f"127.0.0.1:{proxy.port}"
            )
            env = names.env(RABBITMQ_URL=via_proxy, CLASSIFIER_DELAY_MS="200", PREFETCH="20")
            both = [replicas.start(env), replicas.start(env)]
            for replica in both:
                await replica.started()
            await publish_bodies(names, messages)
            await wait_results(sink, 60)

            proxy.cut()
            cut_at = time.monotonic()
            await wait_ready(both, 503, timeout_s=10)
            await asyncio.sleep(max(0.0, 5.0 - (time.monotonic() - cut_at)))
            proxy.restore()
            await wait_ready(both, 200, timeout_s=30)

            await sink.wait_for_ids({m["message_id"] for m in messages}, timeout_s=60)
            await sink.settle(quiet_s=1.5)
            counters = await cluster_counters(redis_client, names)
            assert counters[CounterName.PROCESSED] == len(messages)
            # The cut interrupted held deliveries: each was either finished and redelivered
            # (redelivered_done), or its publish failed (failed; then retried, or requeued by the
            # broker and claimed again). Which of them, depends on the instant of the cut.
            interrupted = (
                counters[CounterName.REDELIVERED_DONE]
                + counters[CounterName.RETRIED]
                + counters[CounterName.FAILED]
            )
            assert interrupted >= 1
            # Nothing was sent twice. A delivery held when its channel closed is redelivered
            # (redelivered_done if it was finished); the held copy is neither claimed nor counted.
            assert counters[CounterName.DUPLICATES] == 0
            twice = {i for i, results in sink.by_id.items() if len(results) > 1}
            print(f"broker outage: {counters}, published twice: {sorted(twice)}")
            assert twice <= unconfirmed_results(both)
            assert all(replica.process and replica.process.poll() is None for replica in both)
        finally:
            replicas.close()


@pytest.mark.skipif(not rabbitmqctl_usable(), reason="needs rabbitmqctl for the local broker")
async def test_connection_closed_by_the_broker_is_restored(
    names: Names, redis_client: aioredis.Redis, amqp: object, tmp_path: Path
) -> None:
    """The broker closing a replica's connection mid-run (rabbitmqctl close_connection, found by
    the replica's connection name): the replica opens a new one within seconds and every message
    gets its result, counted once."""
    replica_id = f"closed-{names.tag}"
    messages = [body(f"c-{i}", f"Доставка {i}") for i in range(300)]
    replicas = Replicas(tmp_path)
    try:
        async with ResultSink(names) as sink:
            replica = replicas.start(
                names.env(REPLICA_ID=replica_id, CLASSIFIER_DELAY_MS="100", PREFETCH="20")
            )
            await replica.started()
            await publish_bodies(names, messages)
            await wait_results(sink, 50)
            name = f"{CONNECTION_NAME}/{replica_id}"
            (before,) = await asyncio.to_thread(broker_connections, name)
            await asyncio.to_thread(close_broker_connections, [before])

            await sink.wait_for_ids({m["message_id"] for m in messages}, timeout_s=60)
            await sink.settle(quiet_s=1.0)
            (after,) = await asyncio.to_thread(broker_connections, name)
            assert after != before
            counters = await cluster_counters(redis_client, names)
            assert counters[CounterName.PROCESSED] == len(messages)
            twice = {i for i, results in sink.by_id.items() if len(results) > 1}
            print(f"closed by the broker: {counters}, published twice: {sorted(twice)}")
            assert twice <= unconfirmed_results([replica])
            assert replica.process is not None
            assert replica.process.poll() is None
    finally:
        replicas.close()


@pytest.mark.skipif(not rabbitmqctl_usable(), reason="needs rabbitmqctl for the local broker")
async def test_a_delivery_held_when_its_channel_closes_is_neither_claimed_nor_counted(
    names: Names,
    redis_client: aioredis.Redis,
    amqp: aio_pika.abc.AbstractRobustConnection,
    tmp_path: Path,
) -> None:
    """A delivery waiting for a claim another replica holds, when the broker closes the
    replica's connection, is given up: its redelivered copy is the one counted (a redelivery of
    a message done meanwhile), never the held copy as a duplicate."""
    replica_id = f"held-{names.tag}"
    other = RedisClaimStore(
        redis_client,
        RedisKeys(names.key_prefix),
        TokenSource("another-replica"),
        lease_s=60,
        dedup_ttl_s=600,
    )
    (held,) = await other.claim_many([ClaimAsk("held-1")])
    assert held.status is ClaimStatus.CLAIMED
    replicas = Replicas(tmp_path)
    try:
        replica = replicas.start(names.env(REPLICA_ID=replica_id))
        await replica.started()
        await publish_bodies(names, [body("held-1", "Где мой заказ?")])
        # In the replica's hands: it finds the claim busy and polls it.
        await wait_own(replica, lambda own: own["in_flight"] == 1, "the delivery")
        name = f"{CONNECTION_NAME}/{replica_id}"
        (before,) = await asyncio.to_thread(broker_connections, name)
        await asyncio.to_thread(close_broker_connections, [before])
        deadline = time.monotonic() + 30
        while await asyncio.to_thread(broker_connections, name) in ([], [before]):
            assert time.monotonic() < deadline, "the replica did not reconnect"
            await asyncio.sleep(0.2)
        # The broker gave the copy it took back to the new channel: it finds the claim busy too.
        deadline = time.monotonic() + 30
        while await ready_messages(amqp, names.input_queue) > 0:
            assert time.monotonic() < deadline, "the copy was not redelivered"
            await asyncio.sleep(0.05)
        await wait_own(replica, lambda own: own["in_flight"] == 1, "the redelivery")

        assert await other.complete_many([Completion("held-1", held.token, False)]) == [
            CompleteStatus.IN_REDIS
        ]
        # Both copies are over once nothing is in hand; what the replica counted is final then.
        own = await wait_own(
            replica,
            lambda own: (
                own["in_flight"] == 0 and own["counters"][CounterName.REDELIVERED_DONE] >= 1
            ),
            "the end of both copies",
        )
        assert own["counters"][CounterName.REDELIVERED_DONE] == 1
        assert own["counters"][CounterName.DUPLICATES] == 0
        assert own["counters"][CounterName.PROCESSED] == 0
        counters = await wait_counter(redis_client, names, CounterName.REDELIVERED_DONE, 1)
        assert counters[CounterName.REDELIVERED_DONE] == 1
        assert counters[CounterName.DUPLICATES] == 0
        assert counters[CounterName.PROCESSED] == 1  # the other replica's
    finally:
        replicas.close()
        await other.aclose()
