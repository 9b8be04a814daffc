"""A faster reader of the frames the broker sends, for the aiormq connections of this process.

aiormq reads each frame with three awaited ``readexactly`` calls under a lock, copies it through a
``BytesIO`` and decodes it with pamqp's generic decoder, attribute by attribute. A delivery is
three frames (``Basic.Deliver``, its content header, its body) and every result published brings
back a ``Basic.Ack``, so this reading was a large share of a replica's CPU (the README's
"The AMQP fast path" has the measured figures).

``BufferedFrameReceiver`` takes whatever the socket has in one read, cuts frames out of that
buffer without awaiting, and decodes those four frames straight into pamqp's own classes, with the
same values pamqp would give (``tests/unit/test_frames.py`` checks them against pamqp). Every other
frame, and any of the four that does not decode to exactly its own length, goes to pamqp as before,
so a malformed frame fails the way it always did.

``install()`` has aiormq use it for the connections opened afterwards in this process (and their
reconnections); ``uninstall()`` gives aiormq its own back. It relies on an aiormq internal, the
module-level ``FrameReceiver`` that ``Connection.connect`` instantiates: only
``worker.amqp.fastpath.switch`` calls ``install()``, after checking the version and that internal.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from typing import Final

import aiormq.connection
from aiormq.connection import ReceivedFrame
from aiormq.exceptions import AMQPConnectionError, InvalidFrameError
from pamqp import commands, decode
from pamqp import frame as pamqp_frame
from pamqp.body import ContentBody
from pamqp.exceptions import PAMQPException
from pamqp.header import ContentHeader

_FRAME_HEADER: Final = struct.Struct(">BHI")  # type, channel, payload size
_FRAME_HEADER_SIZE: Final = 7
_FRAME_END: Final = 0xCE
_READ_SIZE: Final = 65536

_METHOD: Final = 1
_CONTENT_HEADER: Final = 2
_BODY: Final = 3

_INDEX: Final = struct.Struct(">I")
_TAG_AND_BITS: Final = struct.Struct(">QB")
_HEADER_START: Final = struct.Struct(">HHQH")  # class, weight, body size, first flag word

Deliver = commands.Basic.Deliver
Ack = commands.Basic.Ack
Properties = commands.Basic.Properties

# The properties in wire order, with their flag bit and AMQP type (as pamqp declares them).
_PROPERTIES: Final = tuple(
    (name, Properties.flags[name], Properties.amqp_type(name)) for name in Properties.__slots__
)


class _Inexact(Exception):
    """A hot frame that does not decode to exactly its own length: pamqp decides."""


def _short_str(payload: bytes, at: int) -> tuple[str, int]:
    size = payload[at]
    end = at + 1 + size
    if end > len(payload):
        raise _Inexact
    return payload[at + 1 : end].decode(), end


def _deliver(payload: bytes) -> Deliver:
    consumer_tag, at = _short_str(payload, 4)
    delivery_tag, bits = _TAG_AND_BITS.unpack_from(payload, at)
    exchange, at = _short_str(payload, at + 9)
    routing_key, at = _short_str(payload, at)
    if at != len(payload):
        raise _Inexact
    frame = Deliver.__new__(Deliver)
    frame.consumer_tag = consumer_tag
    frame.delivery_tag = delivery_tag
    frame.redelivered = bits & 1 != 0
    frame.exchange = exchange
    frame.routing_key = routing_key
    return frame


def _ack(payload: bytes) -> Ack:
    if len(payload) != 4 + _TAG_AND_BITS.size:
        raise _Inexact
    delivery_tag, bits = _TAG_AND_BITS.unpack_from(payload, 4)
    frame = Ack.__new__(Ack)
    frame.delivery_tag = delivery_tag
    frame.multiple = bits & 1 != 0
    return frame


_METHODS: Final[dict[int, Callable[[bytes], object]]] = {
    Deliver.index: _deliver,
    Ack.index: _ack,
}


def _content_header(payload: bytes) -> ContentHeader:
    class_id, weight, body_size, flags = _HEADER_START.unpack_from(payload)
    if flags & 1:  # more flag words follow: never sent for Basic, left to pamqp
        raise _Inexact
    properties = Properties()
    at = _HEADER_START.size
    for name, bit, kind in _PROPERTIES:
        if not flags & bit:
            continue
        value: object
        if kind == "shortstr":
            value, at = _short_str(payload, at)
        elif kind == "octet":
            value = payload[at]
            at += 1
        else:
            consumed, value = decode.by_type(payload[at:], kind)
            at += consumed
        setattr(properties, name, value)
    if at != len(payload):
        raise _Inexact
    header = ContentHeader(weight, body_size, properties)
    header.class_id = class_id
    return header


def decode_frame(
    data: bytes, start: int, frame_type: int, channel: int, size: int
) -> ReceivedFrame:
    """The frame at ``data[start:]`` (its header already read), as aiormq's reader returns it:
    ``(bytes used, channel, frame)``."""
    end = start + _FRAME_HEADER_SIZE + size
    used = end + 1 - start
    if data[end] == _FRAME_END:
        payload = data[start + _FRAME_HEADER_SIZE : end]
        try:
            if frame_type == _BODY:
                return used, channel, ContentBody(payload)
            if frame_type == _CONTENT_HEADER:
                return used, channel, _content_header(payload)
            if frame_type == _METHOD:
                method = _METHODS.get(_INDEX.unpack_from(payload)[0])
                if method is not None:
                    return used, channel, method(payload)  # type: ignore[return-value]
        except (_Inexact, ValueError, IndexError, struct.error):
            pass
    try:
        return pamqp_frame.unmarshal(data[start : end + 1])
    except PAMQPException as exc:
        raise InvalidFrameError(str(exc)) from exc


# aiormq's own, kept to give it back (this module is imported before anything swaps it).
STOCK_FRAME_RECEIVER: Final[type[aiormq.connection.FrameReceiver]] = aiormq.connection.FrameReceiver


class BufferedFrameReceiver(aiormq.connection.FrameReceiver):
    """aiormq's frame receiver, reading the socket in large pieces (see the module docstring)."""

    made = 0  # how many connections read with it in this process: what the tests look at
    stock = STOCK_FRAME_RECEIVER  # what it stands in for: what the switch checks once installed

    def __init__(self, reader: asyncio.StreamReader) -> None:
        super().__init__(reader)
        BufferedFrameReceiver.made += 1
        self._data = b""
        self._at = 0

    async def get_frame(self) -> ReceivedFrame:
        if not self.started:  # the protocol header exchange: aiormq's own checks
            return await super().get_frame()
        frame = self._take()
        if frame is None:
            async with self.lock:
                while (frame := self._take()) is None:
                    await self._fill()
        return frame

    def _take(self) -> ReceivedFrame | None:
        """The next frame, if the buffer holds all of it."""
        data, at = self._data, self._at
        if len(data) - at < _FRAME_HEADER_SIZE:
            return None
        frame_type, channel, size = _FRAME_HEADER.unpack_from(data, at)
        end = at + _FRAME_HEADER_SIZE + size
        if end >= len(data):
            return None
        self._at = end + 1
        return decode_frame(data, at, frame_type, channel, size)

    async def _fill(self) -> None:
        """Read what the socket has (at least the rest of the next frame's header, or of the
        frame whose header is in) onto the buffer."""
        data, at = self._data, self._at
        if at == len(data) and self.reader.at_eof():
            raise StopAsyncIteration  # closed between frames: aiormq's reader ends too
        needed = _FRAME_HEADER_SIZE + 1
        if len(data) - at >= _FRAME_HEADER_SIZE:
            needed += _FRAME_HEADER.unpack_from(data, at)[2]
        chunk = await self._read(max(_READ_SIZE, needed))
        if not chunk:
            raise AMQPConnectionError(
                "Server connection unexpectedly closed. "
                f"Read {len(data) - at} bytes but {needed} bytes expected"
            )
        self._data = data[at:] + chunk
        self._at = 0

    async def _read(self, size: int) -> bytes:
        try:
            return await self.reader.read(size)
        except ConnectionRefusedError as exc:
            raise AMQPConnectionError(f"Server connection refused: {exc!r}") from exc
        except ConnectionResetError as exc:
            raise AMQPConnectionError(f"Server connection reset: {exc!r}") from exc
        except ConnectionError as exc:
            raise AMQPConnectionError(f"Server connection error: {exc!r}") from exc
        except OSError as exc:
            raise AMQPConnectionError(f"Server communication error: {exc!r}") from exc


def install() -> None:
    """Have aiormq read frames with ``BufferedFrameReceiver`` on connections opened from now on
    (``worker.amqp.fastpath.switch`` checks first that this still takes effect)."""
    aiormq.connection.FrameReceiver = BufferedFrameReceiver  # type: ignore[misc]


def uninstall() -> None:
    """Give aiormq its own frame receiver back (connections already open keep theirs)."""
    if aiormq.connection.FrameReceiver is BufferedFrameReceiver:
        aiormq.connection.FrameReceiver = STOCK_FRAME_RECEIVER  # type: ignore[misc]


def installed() -> bool:
    return aiormq.connection.FrameReceiver is BufferedFrameReceiver
