"""Consuming against the real broker, with the fast path on and off: every delivery reaches the
synchronous callback, in order; on the fast path the channel's reader calls it itself, on the stock
libraries aio-pika does; deliveries settled through the acker leave the queue either way."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import aio_pika
import pytest

from tests.conftest import RABBITMQ_URL, Names
from worker.amqp import fastpath
from worker.amqp.acks import Acker, Outcome
from worker.amqp.connection import connect
from worker.amqp.delivery import Consuming, Delivery, consume
from worker.amqp.fastpath import FastPath
from worker.amqp.fastpath.inline import delivers_inline

COUNT = 300


@pytest.fixture(params=[True, False], ids=["fast", "stock"])
def fast_path(request: pytest.FixtureRequest) -> Iterator[FastPath]:
    """This process on the fast path, then on the stock libraries; stock again afterwards."""
    fast = fastpath.install(request.param)
    assert fast.active is request.param, fast.reason
    yield fast
    fastpath.uninstall()


@pytest.fixture
async def connection(
    names: Names, fast_path: FastPath
) -> AsyncIterator[aio_pika.abc.AbstractRobustConnection]:
    """A connection as the worker makes it; the test's queues are deleted afterwards."""
    connection = await connect(RABBITMQ_URL, name=f"test-{names.tag}", fast_path=fast_path)
    try:
        yield connection
    finally:
        channel = await connection.channel()
        for name in (names.input_queue, names.dead_letter_queue):
            await channel.queue_delete(name, if_unused=False, if_empty=False)
        await connection.close()


async def consuming_channel(
    connection: aio_pika.abc.AbstractRobustConnection,
) -> aio_pika.abc.AbstractChannel:
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=COUNT)
    return channel


async def fill(channel: aio_pika.abc.AbstractChannel, queue: str, count: int) -> None:
    await channel.declare_queue(queue, durable=True)
    for i in range(count):
        await channel.default_exchange.publish(aio_pika.Message(str(i).encode()), routing_key=queue)


async def test_deliveries_reach_the_callback_in_order_inline_only_on_the_fast_path(
    names: Names, connection: aio_pika.abc.AbstractRobustConnection, fast_path: FastPath
) -> None:
    """Every delivery arrives in order; on the fast path all from the channel's reader (one
    caller), on the stock libraries each from a task of its own."""
    channel = await consuming_channel(connection)
    await fill(channel, names.input_queue, COUNT)
    bodies: list[bytes] = []
    callers: set[asyncio.Task[object] | None] = set()
    all_in = asyncio.Event()

    def on_delivery(delivery: Delivery) -> None:
        bodies.append(delivery.body)
        callers.add(asyncio.current_task())
        if len(bodies) == COUNT:
            all_in.set()

    consuming = await consume(channel, names.input_queue, on_delivery)
    await asyncio.wait_for(all_in.wait(), timeout=30)
    assert bodies == [str(i).encode() for i in range(COUNT)]
    raw = await channel.get_underlay_channel()
    assert consuming.inline is delivers_inline(raw) is fast_path.active
    # aiormq's own way runs each callback in a task of its own: 300 callers, not one.
    assert len(callers) == (1 if fast_path.active else COUNT)


async def test_a_failing_callback_does_not_stop_the_deliveries_after_it(
    names: Names, connection: aio_pika.abc.AbstractRobustConnection
) -> None:
    """An exception in the callback leaves the channel open and the next deliveries coming."""
    channel = await consuming_channel(connection)
    await fill(channel, names.input_queue, 3)
    seen: list[bytes] = []
    all_in = asyncio.Event()

    def on_delivery(delivery: Delivery) -> None:
        seen.append(delivery.body)
        if len(seen) == 3:
            all_in.set()
        if delivery.body == b"0":
            raise RuntimeError("a bug in the callback")

    await consume(channel, names.input_queue, on_delivery)
    await asyncio.wait_for(all_in.wait(), timeout=30)
    assert seen == [b"0", b"1", b"2"]
    assert not channel.is_closed


async def test_other_consumers_of_the_channel_keep_aio_pikas_own_way(
    names: Names, connection: aio_pika.abc.AbstractRobustConnection
) -> None:
    """A plain aio-pika consumer on the same channel still gets its ``IncomingMessage``s."""
    channel = await consuming_channel(connection)
    await fill(channel, names.input_queue, 5)
    await fill(channel, names.dead_letter_queue, 5)
    plain_queue = await channel.declare_queue(names.dead_letter_queue, durable=True)
    worker_got: list[bytes] = []
    plain_got: list[bytes] = []
    all_in = asyncio.Event()

    def check() -> None:
        if len(worker_got) == len(plain_got) == 5:
            all_in.set()

    def on_delivery(delivery: Delivery) -> None:
        worker_got.append(delivery.body)
        check()

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        plain_got.append(message.body)
        await message.ack()
        check()

    await consume(channel, names.input_queue, on_delivery)
    await plain_queue.consume(on_message)
    await asyncio.wait_for(all_in.wait(), timeout=30)
    assert worker_got == plain_got == [str(i).encode() for i in range(5)]


async def settle_all(
    channel: aio_pika.abc.AbstractChannel, queue: str, count: int, outcome: Outcome
) -> tuple[Consuming, list[Delivery]]:
    """Consume ``count`` deliveries, settle each with ``outcome`` through the acker, drain it."""
    acker = Acker()
    got: list[Delivery] = []
    all_in = asyncio.Event()

    def on_delivery(delivery: Delivery) -> None:
        acker.track(delivery.channel, delivery.delivery_tag)
        got.append(delivery)
        if len(got) == count:
            all_in.set()

    consuming = await consume(channel, queue, on_delivery)
    await asyncio.wait_for(all_in.wait(), timeout=30)
    await consuming.cancel()
    for delivery in got:
        acker.settle(delivery.channel, delivery.delivery_tag, outcome)
    await acker.drain()
    return consuming, got


async def test_acknowledged_deliveries_leave_and_requeued_ones_come_back_redelivered(
    names: Names, connection: aio_pika.abc.AbstractRobustConnection
) -> None:
    """The acker's frames settle deliveries of either path: requeued ones return marked
    redelivered with their headers, acknowledged ones are gone."""
    channel = await consuming_channel(connection)
    await channel.declare_queue(names.input_queue, durable=True)
    for i in range(10):
        message = aio_pika.Message(str(i).encode(), headers={"n": i}, message_id=f"id-{i}")
        await channel.default_exchange.publish(message, routing_key=names.input_queue)
    _, first = await settle_all(channel, names.input_queue, 10, Outcome.REQUEUE)
    assert [(d.message_id, d.redelivered) for d in first] == [(f"id-{i}", False) for i in range(10)]
    _, again = await settle_all(channel, names.input_queue, 10, Outcome.ACK)
    assert sorted(d.body for d in again) == sorted(str(i).encode() for i in range(10))
    assert all(d.redelivered for d in again)
    assert {d.message_id: d.headers["n"] for d in again} == {f"id-{i}": i for i in range(10)}
    assert {d.message_id: d.incoming.headers["n"] for d in again} == {
        f"id-{i}": i for i in range(10)
    }
    # Closing the channel would give back whatever it left unacknowledged.
    await channel.close()
    fresh = await connection.channel()
    queue = await fresh.declare_queue(names.input_queue, durable=True)
    assert await queue.get(fail=False, no_ack=True) is None
