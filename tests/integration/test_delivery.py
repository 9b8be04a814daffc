"""A raw consumer (``DirectQueue.consume(..., raw=True)``) against the real broker: every delivery
reaches the synchronous callback, in order, called by the channel's reader itself."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aio_pika
import pytest
from aiormq.abc import DeliveredMessage

from tests.conftest import RABBITMQ_URL, Names
from worker.amqp.broker import BackoffRobustConnection
from worker.amqp.delivery import DirectQueue

COUNT = 300


@pytest.fixture
async def connection(names: Names) -> AsyncIterator[aio_pika.abc.AbstractRobustConnection]:
    """A connection of the worker's class; the test's queues are deleted afterwards."""
    connection = await aio_pika.connect_robust(
        RABBITMQ_URL, connection_class=BackoffRobustConnection
    )
    try:
        yield connection
    finally:
        channel = await connection.channel()
        for name in (names.input_queue, names.dead_letter_queue):
            await channel.queue_delete(name, if_unused=False, if_empty=False)
        await connection.close()


async def direct_queue(
    connection: aio_pika.abc.AbstractRobustConnection, name: str
) -> tuple[aio_pika.abc.AbstractChannel, DirectQueue]:
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=COUNT)
    queue = await channel.declare_queue(name, durable=True)
    assert isinstance(queue, DirectQueue)
    return channel, queue


async def fill(channel: aio_pika.abc.AbstractChannel, queue: str, count: int) -> None:
    for i in range(count):
        await channel.default_exchange.publish(aio_pika.Message(str(i).encode()), routing_key=queue)


async def test_deliveries_reach_the_callback_in_order_without_a_task_each(
    names: Names, connection: aio_pika.abc.AbstractRobustConnection
) -> None:
    channel, queue = await direct_queue(connection, names.input_queue)
    await fill(channel, names.input_queue, COUNT)
    bodies: list[bytes] = []
    callers: set[asyncio.Task[object] | None] = set()
    all_in = asyncio.Event()

    def on_delivery(message: DeliveredMessage) -> None:
        bodies.append(message.body)
        callers.add(asyncio.current_task())
        if len(bodies) == COUNT:
            all_in.set()

    await queue.consume(on_delivery, raw=True, no_ack=True)
    await asyncio.wait_for(all_in.wait(), timeout=30)
    assert bodies == [str(i).encode() for i in range(COUNT)]
    # aiormq's own way runs each callback in a task of its own: 300 callers, not one.
    assert len(callers) == 1


async def test_a_failing_callback_does_not_stop_the_deliveries_after_it(
    names: Names, connection: aio_pika.abc.AbstractRobustConnection
) -> None:
    channel, queue = await direct_queue(connection, names.input_queue)
    await fill(channel, names.input_queue, 3)
    seen: list[bytes] = []
    all_in = asyncio.Event()

    def on_delivery(message: DeliveredMessage) -> None:
        seen.append(message.body)
        if len(seen) == 3:
            all_in.set()
        if message.body == b"0":
            raise RuntimeError("a bug in the callback")

    await queue.consume(on_delivery, raw=True, no_ack=True)
    await asyncio.wait_for(all_in.wait(), timeout=30)
    assert seen == [b"0", b"1", b"2"]
    assert not channel.is_closed


async def test_other_consumers_of_the_channel_keep_aiormqs_own_way(
    names: Names, connection: aio_pika.abc.AbstractRobustConnection
) -> None:
    channel, queue = await direct_queue(connection, names.input_queue)
    plain_queue = await channel.declare_queue(names.dead_letter_queue, durable=True)
    await fill(channel, names.input_queue, 5)
    await fill(channel, names.dead_letter_queue, 5)
    raw_got: list[bytes] = []
    plain_got: list[bytes] = []
    all_in = asyncio.Event()

    def check() -> None:
        if len(raw_got) == len(plain_got) == 5:
            all_in.set()

    def on_delivery(message: DeliveredMessage) -> None:
        raw_got.append(message.body)
        check()

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        plain_got.append(message.body)
        await message.ack()
        check()

    await queue.consume(on_delivery, raw=True, no_ack=True)
    await plain_queue.consume(on_message)
    await asyncio.wait_for(all_in.wait(), timeout=30)
    assert raw_got == plain_got == [str(i).encode() for i in range(5)]
