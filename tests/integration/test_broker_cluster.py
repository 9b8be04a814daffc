"""A 3-node RabbitMQ cluster with quorum queues: the node holding the input queue's leader is
killed mid-run, and the replicas, given every node's address, lose nothing.

The cluster is the test's own (``rabbit_nodes``: three ``rabbitmq-server`` processes on loopback
ports, joined with ``join_cluster``). The replicas create the quorum queues (``QUEUE_TYPE=quorum``),
so the input queue's leader is on the node of the first replica that declared it: at least one
replica is connected to the node that is killed. Traffic comes paced from a publisher on a
surviving node and results go to a quorum queue whose leader is on another surviving node, so the
kill costs the test's own tools nothing and everything measured is the replicas' doing.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import defaultdict
from pathlib import Path

import aio_pika
import orjson
import pytest
import redis.asyncio as aioredis

from tests.conftest import Names
from tests.integration.rabbit_nodes import RabbitNode, cluster
from tests.integration.support import Replicas, body, cluster_counters, wait_counter
from worker.observability.metrics import CounterName

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MESSAGES = 6_000
RATE_PER_S = 300  # 20 s of traffic: the kill lands in the middle of a steady flow
KILL_AFTER = 2_000  # messages published before the leader's node is killed
BACK_WITHIN_S = 15.0
MAX_TWICE = MESSAGES * 5 // 1_000  # 0.5 %


class Results:
    """Every result, from a quorum queue bound to the results exchange: when and by whom."""

    def __init__(self) -> None:
        self.by_id: dict[str, int] = defaultdict(int)
        self.seen_at: dict[str, list[float]] = defaultdict(list)  # replica ID -> arrival times
        self.connection: aio_pika.abc.AbstractRobustConnection | None = None

    async def open(self, node: RabbitNode, names: Names) -> Results:
        self.connection = await aio_pika.connect_robust(node.url)
        channel = await self.connection.channel()
        await channel.set_qos(prefetch_count=1_000)
        queue = await channel.declare_queue(
            f"{names.results_exchange}.collected",
            durable=True,
            arguments={"x-queue-type": "quorum"},
        )
        await queue.bind(names.results_exchange, routing_key="#")
        await queue.consume(self._on_result)
        return self

    async def _on_result(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        self.by_id[orjson.loads(message.body)["message_id"]] += 1
        self.seen_at[message.app_id or "?"].append(time.monotonic())
        await message.ack()

    async def wait_for(self, count: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.by_id) < count:
            assert time.monotonic() < deadline, f"{len(self.by_id)} of {count} results arrived"
            await asyncio.sleep(0.1)

    async def close(self) -> None:
        if self.connection is not None:
            await self.connection.close()


def _back_after(times: list[float], killed_at: float) -> float:
    """When a replica's results resumed after the kill: the end of its longest pause that began
    within 5 s of it (a result of work done before the kill may still arrive just after it)."""
    times = sorted(times)
    pauses = [(b - a, b) for a, b in itertools.pairwise(times) if b > killed_at > a - 5]
    return max(pauses)[1] - killed_at if pauses else float("inf")


async def _publish_paced(node: RabbitNode, queue: str, kill: RabbitNode) -> float:
    """Publish ``MESSAGES`` at ``RATE_PER_S`` with confirms; kill ``kill`` after ``KILL_AFTER``.
    Returns when the kill happened (monotonic)."""
    killed_at = 0.0
    connection = await aio_pika.connect(node.url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        started = time.monotonic()
        for start in range(0, MESSAGES, 50):
            if start >= KILL_AFTER and not killed_at:
                kill.kill()
                killed_at = time.monotonic()
            batch = [
                body(f"c-{i}", f"Где мой заказ {i}? order {i}") for i in range(start, start + 50)
            ]
            await asyncio.gather(
                *(
                    channel.default_exchange.publish(
                        aio_pika.Message(
                            orjson.dumps(message),
                            message_id=message["message_id"],
                            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                        ),
                        routing_key=queue,
                    )
                    for message in batch
                )
            )
            due = started + (start + 50) / RATE_PER_S
            await asyncio.sleep(max(0.0, due - time.monotonic()))
    return killed_at


async def test_killing_the_leaders_node_loses_nothing(
    names: Names, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    """With the input queue's leader's node killed mid-run, every one of 6,000 messages gets a
    result, at most 0.5 % of IDs get two, every replica consumes again within 15 s, and the
    cluster's ``processed`` counter equals the number of unique IDs."""
    began = time.monotonic()
    with cluster(tmp_path / "rabbit") as nodes:
        cluster_ready_s = time.monotonic() - began
        replicas = Replicas(tmp_path)
        results = Results()
        try:
            for i in range(3):
                replicas.start(
                    names.env(
                        RABBITMQ_URL=nodes.url,
                        QUEUE_TYPE="quorum",
                        REPLICA_ID=f"r{i}",
                        PREFETCH="64",
                    )
                )
            for replica in replicas:
                await replica.started(timeout_s=90)
            leader = nodes.leader_of(names.input_queue)
            on_leader = [
                replica.env["REPLICA_ID"]
                for replica in replicas
                if f":{leader.amqp_port}/" in str(replica.event("broker_connected"))
            ]
            assert on_leader, "no replica is on the leader's node (declared from another?)"
            collector, publisher = (node for node in nodes.nodes if node is not leader)
            await results.open(collector, names)

            killed_at = await _publish_paced(publisher, names.input_queue, leader)
            await results.wait_for(MESSAGES, timeout_s=90)
            counters = await wait_counter(
                redis_client, names, CounterName.PROCESSED, MESSAGES, timeout_s=30
            )
            await asyncio.sleep(2)  # a late second result would show up here
            counters = await cluster_counters(redis_client, names)

            twice = sum(1 for count in results.by_id.values() if count > 1)
            back_after_s = {
                replica: _back_after(times, killed_at)
                for replica, times in sorted(results.seen_at.items())
            }
            print(
                f"\ncluster ready in {cluster_ready_s:.1f} s; leader {leader.name} killed after "
                f"{KILL_AFTER} messages; replicas on it: {on_leader}; results for "
                f"{len(results.by_id)} IDs, {twice} twice; back consuming after "
                f"{ {r: round(s, 2) for r, s in back_after_s.items()} } s; processed "
                f"{counters[CounterName.PROCESSED]}; whole test {time.monotonic() - began:.0f} s"
            )
            assert len(results.by_id) == MESSAGES
            assert twice <= MAX_TWICE
            assert set(back_after_s) == {"r0", "r1", "r2"}
            assert max(back_after_s.values()) <= BACK_WITHIN_S
            assert counters[CounterName.PROCESSED] == len(results.by_id)
            assert all(not replica.exited for replica in replicas)
            for name in on_leader:
                moved = next(r for r in replicas if r.env["REPLICA_ID"] == name)
                assert moved.event("broker_connection_lost") is not None
                assert moved.event("broker_reconnected") is not None
        finally:
            await results.close()
            replicas.close()
