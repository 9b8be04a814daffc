"""Results against the real broker, with the fast path on (one write per loop turn) and off (aiormq's
``basic_publish``): each one confirmed, intact, in order."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import aio_pika
import aiormq
import pytest

from tests.conftest import Names
from worker.amqp import fastpath
from worker.amqp.broker import PUBLISH_ERRORS
from worker.amqp.fastpath import FastPath
from worker.amqp.results import ResultOut
from worker.core.errors import PermanentError


@pytest.fixture(params=[True, False], ids=["fast", "stock"])
def fast_path(request: pytest.FixtureRequest) -> Iterator[FastPath]:
    """This process on the fast path, then on the stock libraries; stock again afterwards."""
    fast = fastpath.install(request.param)
    assert fast.active is request.param, fast.reason
    yield fast
    fastpath.uninstall()


async def bound_queue(
    connection: aio_pika.abc.AbstractRobustConnection, exchange: str
) -> tuple[aio_pika.abc.AbstractChannel, aio_pika.abc.AbstractQueue]:
    channel = await connection.channel(publisher_confirms=True)
    results = await channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, durable=True)
    queue = await channel.declare_queue(exclusive=True)
    await queue.bind(results, routing_key="#")
    return channel, queue


async def underlay(channel: aio_pika.abc.AbstractChannel) -> aiormq.Channel:
    raw = await channel.get_underlay_channel()
    assert isinstance(raw, aiormq.Channel)
    return raw


async def drain(
    queue: aio_pika.abc.AbstractQueue, count: int
) -> list[aio_pika.abc.AbstractIncomingMessage]:
    got: list[aio_pika.abc.AbstractIncomingMessage] = []
    async with queue.iterator() as messages:
        async for message in messages:
            got.append(message)
            await message.ack()
            if len(got) == count:
                break
    return got


async def test_a_turns_results_are_confirmed_and_arrive_whole_and_in_order(
    names: Names, amqp: aio_pika.abc.AbstractRobustConnection, fast_path: FastPath
) -> None:
    """Every result of a turn is confirmed and arrives with its body, properties and label, in
    order, beside a plain publish on the same channel; directly only on the fast path."""
    channel, queue = await bound_queue(amqp, names.results_exchange)
    raw = await underlay(channel)
    out = ResultOut(
        lambda: underlay(channel), names.results_exchange, app_id="replica-t", fast_path=fast_path
    )
    assert out.direct is fast_path.active
    frame_max = raw.max_content_size
    bodies = [f'{{"n": {i}}}'.encode() for i in range(499)] + [b"x" * (frame_max * 2 + 17)]
    # A publish through aiormq's own path on the same channel, mid-batch, keeps its own tag.
    futures = [
        out.publish(b, "label.a" if i % 2 else "label.b", f"id-{i}")
        for i, b in enumerate(bodies[:250])
    ]
    plain = asyncio.ensure_future(
        raw.basic_publish(b"plain", exchange=names.results_exchange, routing_key="plain")
    )
    futures += [out.publish(b, "label.c", f"id-{i}") for i, b in enumerate(bodies[250:], 250)]
    await asyncio.wait_for(asyncio.gather(*futures, plain), timeout=10)
    got = await asyncio.wait_for(drain(queue, len(bodies) + 1), timeout=10)
    results = [m for m in got if m.body != b"plain"]
    assert [m.body for m in results] == bodies
    assert [m.message_id for m in results] == [f"id-{i}" for i in range(len(bodies))]
    assert {m.app_id for m in results} == {"replica-t"}
    assert {m.delivery_mode for m in results} == {aio_pika.DeliveryMode.PERSISTENT}
    assert {m.content_type for m in results} == {"application/json"}
    assert [m.routing_key for m in results[:4]] == ["label.b", "label.a", "label.b", "label.a"]
    assert results[-1].routing_key == "label.c"


async def test_an_unsendable_id_fails_alone(
    names: Names, amqp: aio_pika.abc.AbstractRobustConnection, fast_path: FastPath
) -> None:
    """A message_id too long for AMQP fails its own result as permanent; the others go out."""
    channel, queue = await bound_queue(amqp, names.results_exchange)
    out = ResultOut(lambda: underlay(channel), names.results_exchange, fast_path=fast_path)
    good = out.publish(b"{}", "k", "fine")
    bad = out.publish(b"{}", "k", "я" * 200)
    await asyncio.wait_for(good, timeout=5)
    with pytest.raises(PermanentError, match="message_id"):
        await bad
    assert [m.message_id for m in await asyncio.wait_for(drain(queue, 1), timeout=5)] == ["fine"]


async def test_a_closed_channel_fails_the_waiting_results_instead_of_hanging(
    names: Names, amqp: aio_pika.abc.AbstractRobustConnection, fast_path: FastPath
) -> None:
    """Results waiting on a channel the broker closes fail with a retryable publish error, and so
    do results queued afterwards."""
    connection = await aiormq.connect(str(amqp.url))
    try:
        channel = await connection.channel(publisher_confirms=True)

        async def current() -> aiormq.Channel:
            assert isinstance(channel, aiormq.Channel)
            return channel

        # Publishing to an exchange that does not exist makes the broker close the channel; the
        # waiting results fail with errors the broker maps to PublishFailed, and so do later ones.
        out = ResultOut(current, f"{names.results_exchange}.missing", fast_path=fast_path)
        pending = [out.publish(b"{}", "k", f"id-{i}") for i in range(20)]
        outcomes = await asyncio.wait_for(
            asyncio.gather(*pending, return_exceptions=True), timeout=10
        )
        assert all(isinstance(o, PUBLISH_ERRORS) for o in outcomes), outcomes
        later = await asyncio.wait_for(
            asyncio.gather(out.publish(b"{}", "k", "after"), return_exceptions=True), timeout=5
        )
        assert isinstance(later[0], PUBLISH_ERRORS)
    finally:
        await connection.close()
