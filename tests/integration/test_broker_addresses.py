"""RABBITMQ_URL listing several brokers: a dead address is passed over, and a connection whose
node dies moves on to the next address."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aio_pika
import pytest
import redis.asyncio as aioredis

from tests.conftest import RABBITMQ_URL, Names
from tests.integration.rabbit_nodes import RabbitNode, free_port
from tests.integration.support import (
    Replicas,
    ResultSink,
    body,
    publish_bodies,
    run_cli,
    wait_counter,
)
from worker.amqp.connection import connect, connect_once
from worker.core.redaction import redact_url
from worker.observability.metrics import CounterName

pytestmark = pytest.mark.integration


def _dead_address() -> str:
    return f"amqp://guest:dead-pw@127.0.0.1:{free_port()}/"


async def test_the_commands_pass_over_a_dead_address() -> None:
    """Whichever address a try starts from, a list of two dead addresses and the live broker
    connects, every time."""
    url = ",".join([_dead_address(), RABBITMQ_URL, _dead_address()])
    live_port = aio_pika.connection.make_url(RABBITMQ_URL).port
    for _ in range(12):  # the start is random: most of 12 tries start from a dead one
        connection = await connect_once(url, name="test-addresses")
        assert connection.url.port == live_port
        await connection.close()


async def test_a_replica_given_a_dead_and_a_live_address_works(
    names: Names, redis_client: aioredis.Redis, amqp: object, tmp_path: Path
) -> None:
    """A replica and ``publish`` given a dead address beside the live one process every message,
    and neither prints the dead address's password."""
    url = f"{_dead_address()},{RABBITMQ_URL}"
    env = names.env(RABBITMQ_URL=url)
    replicas = Replicas(tmp_path)
    try:
        async with ResultSink(names) as sink:
            replica = replicas.start(env)
            await replica.started(timeout_s=60)
            await publish_bodies(names, [body(f"a-{i}", f"order {i} status?") for i in range(100)])
            jsonl = tmp_path / "more.jsonl"
            jsonl.write_text(
                "".join(f'{{"message_id": "b-{i}", "text": "refund {i}"}}\n' for i in range(50))
            )
            for _ in range(3):  # from either start
                code, lines = run_cli(env, "publish", str(jsonl))
                assert code == 0, lines
                assert not any("dead-pw" in line for line in lines)
            ids = {f"a-{i}" for i in range(100)} | {f"b-{i}" for i in range(50)}
            await sink.wait_for_ids(ids, timeout_s=60)
            await wait_counter(redis_client, names, CounterName.PROCESSED, 150, timeout_s=30)
        connected = replica.event("broker_connected")
        assert connected is not None
        assert connected["broker"] == redact_url(RABBITMQ_URL)
        assert "dead-pw" not in replica.log_text()
    finally:
        replicas.close()


async def test_a_connection_moves_on_past_dead_nodes_when_its_node_dies(tmp_path: Path) -> None:
    """A robust connection over three brokers, whose broker and the next one in its list are
    killed, tries the next address at each attempt and is back on the third broker within 15 s,
    with its channel and queue restored there."""
    nodes = [RabbitNode(tmp_path / name) for name in ("a", "b", "c")]
    try:
        for node in nodes:
            node.launch()
        for node in nodes:
            node.wait_started()
        connection = await connect(",".join(node.url for node in nodes), name="test-move")
        try:
            ports = [address.port for address in connection.addresses]
            by_port = {node.amqp_port: node for node in nodes}
            assert connection.address.port == ports[0]
            channel = await connection.channel()
            queue = await channel.declare_queue("moves.with.me", durable=True)

            restored = asyncio.Event()  # set once channels and queues are back, not just the socket
            connection.reconnect_callbacks.add(lambda *_: restored.set())
            by_port[ports[1]].kill()  # the next in its list: its first attempt fails
            by_port[ports[0]].kill()
            await asyncio.wait_for(restored.wait(), timeout=15)
            assert connection.address.port == ports[2]
            await channel.default_exchange.publish(aio_pika.Message(b"after"), queue.name)
            got = await queue.get(timeout=10)
            assert got.body == b"after"
        finally:
            await connection.close()
    finally:
        for node in nodes:
            node.stop()
