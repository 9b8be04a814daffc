"""A bare AMQP 0-9-1 publisher built on pamqp's frame codec.

aio-pika (through aiormq) gives every message without a ``message_id`` a random one, so it cannot
send what some producers do send: a message with no ID at all. Tests use this to send exactly that.
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

from pamqp import body as body_frame
from pamqp import commands, frame, header
from pamqp.common import FieldTable
from pamqp.constants import FRAME_END
from pamqp.header import ProtocolHeader


async def _read_frame(reader: asyncio.StreamReader) -> object:
    raw = await reader.readexactly(7)
    size = int.from_bytes(raw[3:7], "big")
    raw += await reader.readexactly(size + 1)
    assert raw[-1:] == bytes([FRAME_END])
    _, _, value = frame.unmarshal(raw)
    return value


async def _expect(reader: asyncio.StreamReader, kind: type) -> object:
    while True:
        value = await _read_frame(reader)
        if isinstance(value, kind):
            return value
        if isinstance(value, commands.Connection.Close | commands.Channel.Close):
            raise RuntimeError(f"broker closed: {value}")


async def publish_without_id(url: str, queue: str, bodies: list[bytes]) -> None:
    """Publish ``bodies`` to ``queue`` through the default exchange, with no properties at all."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port or 5672)
    try:
        writer.write(ProtocolHeader().marshal())
        await _expect(reader, commands.Connection.Start)
        credentials = f"\0{parts.username or 'guest'}\0{parts.password or 'guest'}"
        writer.write(
            frame.marshal(
                commands.Connection.StartOk(
                    client_properties=FieldTable(), mechanism="PLAIN", response=credentials
                ),
                0,
            )
        )
        tune = await _expect(reader, commands.Connection.Tune)
        assert isinstance(tune, commands.Connection.Tune)
        writer.write(
            frame.marshal(
                commands.Connection.TuneOk(
                    channel_max=tune.channel_max, frame_max=tune.frame_max, heartbeat=0
                ),
                0,
            )
        )
        vhost = parts.path[1:] or "/"
        writer.write(frame.marshal(commands.Connection.Open(virtual_host=vhost), 0))
        await _expect(reader, commands.Connection.OpenOk)
        writer.write(frame.marshal(commands.Channel.Open(), 1))
        await _expect(reader, commands.Channel.OpenOk)
        writer.write(frame.marshal(commands.Confirm.Select(), 1))
        await _expect(reader, commands.Confirm.SelectOk)
        for payload in bodies:
            writer.write(frame.marshal(commands.Basic.Publish(exchange="", routing_key=queue), 1))
            writer.write(frame.marshal(header.ContentHeader(0, len(payload)), 1))
            writer.write(frame.marshal(body_frame.ContentBody(payload), 1))
        confirmed = 0
        while confirmed < len(bodies):
            ack = await _expect(reader, commands.Basic.Ack)
            assert isinstance(ack, commands.Basic.Ack)
            confirmed = ack.delivery_tag
        writer.write(
            frame.marshal(
                commands.Connection.Close(
                    reply_code=200, reply_text="bye", class_id=0, method_id=0
                ),
                0,
            )
        )
        await _expect(reader, commands.Connection.CloseOk)
    finally:
        writer.close()
