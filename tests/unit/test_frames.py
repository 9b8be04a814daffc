"""``BufferedFrameReceiver`` yields, frame for frame, what aiormq's reader and pamqp yield."""

from __future__ import annotations

import asyncio
import datetime
import random
from typing import Any

import pamqp.frame
import pytest
from aiormq.connection import FrameReceiver
from aiormq.exceptions import AMQPConnectionError, InvalidFrameError
from pamqp import commands
from pamqp.body import ContentBody
from pamqp.header import ContentHeader
from pamqp.heartbeat import Heartbeat

from worker.amqp.fastpath.frames import BufferedFrameReceiver

Basic = commands.Basic


def wire(*frames: Any, channel: int = 1) -> bytes:
    return b"".join(pamqp.frame.marshal(frame, channel) for frame in frames)


def fields(frame: Any) -> tuple[Any, ...]:
    """A frame's type and every value it carries, for comparing two decodings."""
    if isinstance(frame, ContentHeader):
        properties = frame.properties
        values = tuple(getattr(properties, name) for name in properties.__slots__)
        return (ContentHeader, frame.class_id, frame.weight, frame.body_size, values)
    if isinstance(frame, ContentBody):
        return (ContentBody, frame.value)
    slots = getattr(frame, "__slots__", ())
    return (type(frame), *(getattr(frame, name) for name in slots))


async def read_all(receiver_class: type[FrameReceiver], pieces: list[bytes]) -> list[Any]:
    """Every frame a receiver reads from a stream fed ``pieces`` one after another."""
    reader = asyncio.StreamReader()
    receiver = receiver_class(reader)
    receiver.started = True  # the protocol header exchange is aiormq's own code in both
    out: list[Any] = []

    async def feed() -> None:
        for piece in pieces[:-1]:
            reader.feed_data(piece)
            await asyncio.sleep(0)
        reader.feed_data(pieces[-1])
        reader.feed_eof()  # with the last piece: the stream then ends between frames

    feeding = asyncio.create_task(feed())
    async for used, channel, frame in receiver:
        out.append((used, channel, fields(frame)))
    await feeding
    return out


def split(data: bytes, rng: random.Random) -> list[bytes]:
    """``data`` cut at random places, some pieces a single byte."""
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, len(data) // 7)))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


def random_properties(rng: random.Random) -> Basic.Properties:
    values: dict[str, Any] = {
        "content_type": "application/json",
        "content_encoding": "gzip",
        "headers": {"x-attempt": rng.randint(1, 9), "x-reason": "ошибка", "nested": {"a": [1, 2]}},
        "delivery_mode": rng.choice([1, 2]),
        "priority": rng.randint(0, 9),
        "correlation_id": "c-" + str(rng.random()),
        "reply_to": "amq.rabbitmq.reply-to",
        "expiration": "60000",
        "message_id": "сообщение-" + str(rng.randint(0, 10**9)),
        "timestamp": datetime.datetime(2026, 11, 30, 12, 0, rng.randint(0, 59)),
        "message_type": "chat",
        "user_id": "guest",
        "app_id": "replica-" + "x" * rng.randint(0, 200),
    }
    chosen = {name: value for name, value in values.items() if rng.random() < 0.5}
    return Basic.Properties(**chosen)


def delivery_traffic(rng: random.Random, count: int) -> bytes:
    """Deliveries (method, header, body), publisher confirms, and a few other frames between."""
    out: list[bytes] = []
    for tag in range(1, count + 1):
        body = rng.randbytes(rng.choice([0, 1, 180, 5000]))
        deliver = Basic.Deliver(
            consumer_tag="ctag-" + "é" * rng.randint(0, 60),
            delivery_tag=tag * 2**33 if tag % 5 == 0 else tag,
            redelivered=rng.random() < 0.3,
            exchange=rng.choice(["", "neiromatrius"]),
            routing_key="neiromatrius.messages",
        )
        frames: list[Any] = [deliver, ContentHeader(0, len(body), random_properties(rng))]
        if body:
            frames.append(ContentBody(body))
        frames.append(Basic.Ack(delivery_tag=tag, multiple=rng.random() < 0.5))
        if tag % 10 == 0:
            frames.append(Basic.Nack(delivery_tag=tag, multiple=True, requeue=False))
            frames.append(commands.Basic.ConsumeOk(consumer_tag="ctag-2"))
        out.append(wire(*frames, channel=rng.randint(1, 3)))
        if tag % 25 == 0:
            out.append(pamqp.frame.marshal(Heartbeat(), 0))
    return b"".join(out)


async def test_frames_decode_as_pamqp_decodes_them_however_the_stream_is_cut() -> None:
    """Deliveries with any properties, confirms and other frames come out with pamqp's values,
    whether the socket hands them over whole or in pieces as small as a byte."""
    rng = random.Random(7)
    data = delivery_traffic(rng, 200)
    expected = await read_all(FrameReceiver, [data])
    assert len(expected) > 700
    assert await read_all(BufferedFrameReceiver, [data]) == expected
    assert await read_all(BufferedFrameReceiver, split(data, rng)) == expected


async def test_the_hot_frames_keep_values_at_the_limits_of_their_types() -> None:
    """The four frames of the hot path, with the largest tags and longest strings, decode to
    pamqp's classes with pamqp's values."""
    properties = Basic.Properties(
        content_type="application/json", delivery_mode=2, message_id="m-1", app_id="r-1"
    )
    frames = [
        Basic.Deliver("т" * 127, 2**63 - 1, True, "e" * 127, "r" * 255),
        ContentHeader(0, 2**63 - 1, properties),
        ContentBody(b"\xce" * 3),
        Basic.Ack(2**63 - 1, True),
    ]
    data = wire(*frames, channel=65535)
    got = await read_all(BufferedFrameReceiver, [data])
    assert got == await read_all(FrameReceiver, [data])
    assert [frame for _, _, (frame, *_) in got] == [type(f) for f in frames]


@pytest.mark.parametrize(
    "frame",
    [
        Basic.Deliver("ctag", 1, False, "", "rk"),
        ContentHeader(0, 3, Basic.Properties(message_id="m-1")),
        Basic.Ack(1, False),
    ],
)
async def test_a_frame_with_a_wrong_length_inside_decodes_as_pamqp_decodes_it(frame: Any) -> None:
    """A hot frame whose fields do not fill it exactly is left to pamqp: the same answer."""
    data = bytearray(wire(frame))
    data[-1:-1] = b"\x00\x00\x00"  # three more payload bytes than the fields use
    data[3:7] = (int.from_bytes(data[3:7], "big") + 3).to_bytes(4, "big")
    assert await read_all(BufferedFrameReceiver, [bytes(data)]) == await read_all(
        FrameReceiver, [bytes(data)]
    )


async def test_a_frame_without_its_end_marker_is_refused_as_aiormq_refuses_it() -> None:
    """A frame whose last byte is not the frame end is an ``InvalidFrameError``."""
    data = bytearray(wire(Basic.Deliver("ctag", 1, False, "", "rk")))
    data[-1] = 0
    for receiver_class in (FrameReceiver, BufferedFrameReceiver):
        with pytest.raises(InvalidFrameError, match="Last byte error"):
            await read_all(receiver_class, [bytes(data)])


async def test_a_stream_cut_inside_a_frame_is_a_connection_error() -> None:
    """The broker going away in the middle of a frame is an ``AMQPConnectionError``; between
    frames it simply ends the stream."""
    data = wire(Basic.Ack(1, False), Basic.Ack(2, False))
    with pytest.raises(AMQPConnectionError, match="unexpectedly closed"):
        await read_all(BufferedFrameReceiver, [data[:-5]])
    assert len(await read_all(BufferedFrameReceiver, [data])) == 2
