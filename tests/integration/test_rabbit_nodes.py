"""The tests' own RabbitMQ nodes: a spare node boots on its own ports, apart from the shared broker."""

from __future__ import annotations

from pathlib import Path

import aio_pika

from tests.conftest import RABBITMQ_URL
from tests.integration.rabbit_nodes import spare_node


async def test_a_spare_node_starts_and_accepts_amqp(tmp_path: Path) -> None:
    """A spare node accepts an AMQP connection and keeps a queue of its own that the shared
    broker does not see, and stopping it by PID leaves no process behind."""
    with spare_node(tmp_path) as node:
        assert node.name.startswith("t")
        assert node.name.endswith("@localhost")
        assert node.amqp_port != 5672
        assert node.dist_port != 25672
        connection = await aio_pika.connect(node.url)
        async with connection:
            channel = await connection.channel()
            queue = await channel.declare_queue("spare.only.here", durable=True)
            await channel.default_exchange.publish(aio_pika.Message(b"hi"), queue.name)
            got = await queue.get(timeout=10)
            assert got.body == b"hi"
            await got.ack()
        shared = await aio_pika.connect(RABBITMQ_URL)
        async with shared:
            channel = await shared.channel()
            try:
                await channel.declare_queue("spare.only.here", passive=True)
            except aio_pika.exceptions.ChannelNotFoundEntity:
                pass
            else:
                raise AssertionError("the spare node's queue is on the shared broker")
        process = node.process
    assert process is not None
    assert process.poll() is not None
    assert not node.running()
