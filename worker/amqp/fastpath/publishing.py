"""Direct publishing: every result queued in one event-loop turn leaves in a single socket write.

aiormq's ``basic_publish`` takes the channel lock, arms a timeout, writes three frames and waits
for the writer to drain them, once per message; at thousands of results a second that machinery
cost more than the rest of a message's work. ``DirectPublisher.write`` marshals a whole batch into
one payload under the channel lock, registering one confirmation future per result in the
channel's own table, as ``basic_publish`` does (the caller's own future is registered, so no future
of aiormq's store is made per result; see ``_Watch``). The broker confirms each result (or several
at once); each caller still waits for its own confirmation.

The frames are the ones ``basic_publish`` writes, built with less work: the ``Basic.Publish`` frame
is the same bytes for every result with the same label, so it is marshalled once per label, and
the content header (four properties) is packed directly; ``tests/unit/test_result_out.py`` holds
both byte for byte to pamqp's own marshalling.

aiormq internals relied on (``worker.amqp.fastpath.switch`` checks each at start-up): the channel
fields ``confirmations`` (delivery tag -> future, resolved by the broker's ack, failed by a nack),
``delivery_tag`` (the last tag used), ``write_queue`` (the connection's writer takes
``aiormq.abc.ChannelFrame``s from it), ``number`` and ``max_content_size``.
"""

from __future__ import annotations

import asyncio
import struct
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import cast

import pamqp.encode
import pamqp.frame
from aiormq import Channel
from aiormq.abc import ChannelFrame
from pamqp.commands import Basic
from pamqp.constants import FRAME_END

from worker.core.errors import PermanentError

_CONTENT_HEADER_FRAME = 2
_BODY_FRAME = 3
_BASIC_CLASS = 60
_FLAG_CONTENT_TYPE = 0x8000
_FLAG_HEADERS = 0x2000
_FLAG_DELIVERY_MODE = 0x1000
_FLAG_MESSAGE_ID = 0x0080
_FLAG_APP_ID = 0x0008
_END = bytes([FRAME_END])
CONTENT_TYPE = b"application/json"
PERSISTENT = 2
MAX_SHORTSTR = 255


@dataclass(slots=True)
class Outgoing:
    """One result waiting to leave; ``done`` resolves on the broker's confirm."""

    body: bytes
    routing_key: str
    message_id: str
    done: asyncio.Future[object]
    headers: Mapping[str, str] | None = None  # a trace context (``worker.observability.tracing``)


def _shortstr(value: bytes) -> bytes:
    if len(value) > MAX_SHORTSTR:
        raise ValueError("longer than an AMQP short string (255 bytes)")
    return bytes([len(value)]) + value


def content_header(
    channel: int,
    body_size: int,
    message_id: str,
    app_id: str | None,
    headers: Mapping[str, str] | None = None,
) -> bytes:
    """The content header frame of a persistent JSON result: what pamqp marshals for
    ``Basic.Properties(content_type, headers, delivery_mode=2, message_id, app_id)``."""
    flags = _FLAG_CONTENT_TYPE | _FLAG_DELIVERY_MODE | _FLAG_MESSAGE_ID
    table = b""
    if headers:
        flags |= _FLAG_HEADERS
        table = pamqp.encode.field_table(dict(headers))
    tail = _shortstr(message_id.encode())
    if app_id:
        flags |= _FLAG_APP_ID
        tail += _shortstr(app_id.encode())
    payload = (
        struct.pack(">HHQH", _BASIC_CLASS, 0, body_size, flags)
        + _shortstr(CONTENT_TYPE)
        + table
        + bytes([PERSISTENT])
        + tail
    )
    return struct.pack(">BHI", _CONTENT_HEADER_FRAME, channel, len(payload)) + payload + _END


def body_frames(channel: int, body: bytes, max_content: int) -> bytes:
    """``body`` cut into content body frames of at most ``max_content`` bytes each."""
    parts = []
    for start in range(0, len(body), max_content):
        chunk = body[start : start + max_content]
        parts.append(struct.pack(">BHI", _BODY_FRAME, channel, len(chunk)) + chunk + _END)
    return b"".join(parts)


class _Watch:
    """The results in flight on one channel, failed together if the channel closes under them.

    aiormq rejects the futures of its own store when a channel closes; one future of that store
    per channel (``closed``) stands for all the results in flight on it, instead of one per result.
    ``in_flight`` is pruned from the front (results are confirmed roughly in order) on each write.
    """

    __slots__ = ("channel", "closed", "in_flight")

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.in_flight: deque[asyncio.Future[object]] = deque()
        self.closed = channel.create_future()
        self.closed.add_done_callback(self.fail_in_flight)

    def fail_in_flight(self, closed: asyncio.Future[object]) -> None:
        error = (
            asyncio.CancelledError() if closed.cancelled() else closed.exception()
        ) or ConnectionError("the channel closed before the broker confirmed the result")
        while self.in_flight:
            done = self.in_flight.popleft()
            if not done.done():
                done.set_exception(error)

    def prune(self) -> None:
        while self.in_flight and self.in_flight[0].done():
            self.in_flight.popleft()


class DirectPublisher:
    """Writes batches of results to ``exchange`` on a confirm-mode aiormq channel."""

    def __init__(self, exchange: str, app_id: str | None) -> None:
        self._exchange = exchange
        self._app_id = app_id
        self._publish_frames: dict[tuple[int, str], bytes] = {}
        self._watch: _Watch | None = None  # of the channel results go out on now

    async def write(self, channel: Channel, batch: Sequence[Outgoing]) -> None:
        """Send ``batch`` in one write; each ``done`` resolves on its confirm. Raises what the
        channel raises (nothing of the batch was sent then)."""
        watch = self._watch_of(channel)
        async with channel.lock:  # publishes on this channel keep their delivery-tag order
            payload, tags = self._frame(channel, batch)
            written = False
            try:
                await channel.write_queue.put(ChannelFrame(payload=payload, should_close=False))
                written = True
            finally:
                if not written:  # the broker never saw them: give their tags back
                    for tag in tags:
                        channel.confirmations.pop(tag, None)
                    channel.delivery_tag -= len(tags)
        watch.in_flight.extend(item.done for item in batch)
        if watch.closed.done():  # it closed while we wrote: nobody will confirm them
            watch.fail_in_flight(watch.closed)

    def _watch_of(self, channel: Channel) -> _Watch:
        """The watch of ``channel``, new after a reconnection (the old one still fails what was
        in flight on the old channel when that closes)."""
        watch = self._watch
        if watch is None or watch.channel is not channel or watch.closed.done():
            watch = self._watch = _Watch(channel)
        watch.prune()
        return watch

    def _frame(self, channel: Channel, batch: Sequence[Outgoing]) -> tuple[bytes, list[int]]:
        """Frames for every result in ``batch``, each one's future registered as its
        confirmation (the broker's ack resolves it, a nack fails it); one that cannot be encoded
        fails alone. Returns the payload and the delivery tags used."""
        parts: list[bytes] = []
        tags: list[int] = []
        number = channel.number
        max_content = channel.max_content_size
        confirmations = cast(dict[int, asyncio.Future[object]], channel.confirmations)
        for item in batch:
            try:
                header = content_header(
                    number, len(item.body), item.message_id, self._app_id, item.headers
                )
            except ValueError as exc:
                item.done.set_exception(
                    PermanentError(f"the result's message_id cannot be sent over AMQP: {exc}")
                )
                continue
            parts += (
                self._publish_frame(number, item.routing_key),
                header,
                body_frames(number, item.body, max_content),
            )
            channel.delivery_tag += 1
            confirmations[channel.delivery_tag] = item.done
            tags.append(channel.delivery_tag)
        return b"".join(parts), tags

    def _publish_frame(self, channel: int, routing_key: str) -> bytes:
        key = (channel, routing_key)
        frame = self._publish_frames.get(key)
        if frame is None:
            method = Basic.Publish(exchange=self._exchange, routing_key=routing_key)
            frame = pamqp.frame.marshal(method, channel)
            if len(self._publish_frames) < 1024:  # labels are few; a bound all the same
                self._publish_frames[key] = frame
        return frame
