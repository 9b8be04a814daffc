"""Results out: every result published in one event-loop turn leaves in a single socket write.

aiormq's ``basic_publish`` takes the channel lock, arms a timeout, writes three frames and waits
for the writer to drain them, once per message; at thousands of results a second that machinery
cost more than the rest of a message's work. Here results are queued, and one flush per loop turn
marshals them all into one payload under the channel lock, registering one confirmation future per
result in the channel's own table (``confirmations``), exactly as ``basic_publish`` does. The broker
confirms each result (or several at once); each caller still waits for its own confirmation, so a
result is never taken as published before the broker has it.

The frames are the ones ``basic_publish`` writes, built with less work: the ``Basic.Publish`` frame
is the same bytes for every result with the same label, so it is marshalled once per label, and
the content header (four properties) is packed directly; ``tests/unit/test_result_out.py`` holds
both byte for byte to pamqp's own marshalling.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import pamqp.frame
from aiormq import Channel
from aiormq.abc import ChannelFrame
from pamqp.commands import Basic
from pamqp.constants import FRAME_END

from worker.errors import PermanentError

_CONTENT_HEADER_FRAME = 2
_BODY_FRAME = 3
_BASIC_CLASS = 60
_FLAG_CONTENT_TYPE = 0x8000
_FLAG_DELIVERY_MODE = 0x1000
_FLAG_MESSAGE_ID = 0x0080
_FLAG_APP_ID = 0x0008
_END = bytes([FRAME_END])
CONTENT_TYPE = b"application/json"
PERSISTENT = 2


def _shortstr(value: bytes) -> bytes:
    if len(value) > 255:
        raise ValueError("longer than an AMQP short string (255 bytes)")
    return bytes([len(value)]) + value


def content_header(channel: int, body_size: int, message_id: str, app_id: str | None) -> bytes:
    """The content header frame of a persistent JSON result: what pamqp marshals for
    ``Basic.Properties(content_type, delivery_mode=2, message_id, app_id)``."""
    flags = _FLAG_CONTENT_TYPE | _FLAG_DELIVERY_MODE | _FLAG_MESSAGE_ID
    tail = _shortstr(message_id.encode())
    if app_id:
        flags |= _FLAG_APP_ID
        tail += _shortstr(app_id.encode())
    payload = (
        struct.pack(">HHQH", _BASIC_CLASS, 0, body_size, flags)
        + _shortstr(CONTENT_TYPE)
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


@dataclass(slots=True)
class _Pending:
    body: bytes
    routing_key: str
    message_id: str
    done: asyncio.Future[None]


@dataclass(slots=True)
class _Sent:
    tag: int
    frames: bytes
    item: _Pending
    confirmation: asyncio.Future[object]


class ResultOut:
    """Publishes results to ``exchange`` with confirms, batched per event-loop turn.

    ``get_channel`` returns the current aiormq channel (in confirm mode); it changes when the
    robust connection reconnects, so it is asked on every flush.
    """

    def __init__(
        self,
        get_channel: Callable[[], Awaitable[Channel]],
        exchange: str,
        *,
        app_id: str | None = None,
    ) -> None:
        self._get_channel = get_channel
        self._exchange = exchange
        self._app_id = app_id
        self._pending: list[_Pending] = []
        self._publish_frames: dict[tuple[int, str], bytes] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def publish(self, body: bytes, routing_key: str, message_id: str) -> asyncio.Future[None]:
        """Queue one result; the future resolves when the broker confirms it, or raises if the
        broker rejects it or the channel closes first."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        if not self._pending:
            task = loop.create_task(self._flush())  # runs after this turn's results are queued
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self._pending.append(_Pending(body, routing_key, message_id, done))
        return done

    async def _flush(self) -> None:
        batch, self._pending = self._pending, []
        try:
            channel = await self._get_channel()
            async with channel.lock:  # publishes on this channel keep their delivery-tag order
                sent = self._frame(channel, batch)
                payload = b"".join(s.frames for s in sent)
                written = False
                try:
                    await channel.write_queue.put(ChannelFrame(payload=payload, should_close=False))
                    written = True
                finally:
                    if not written:  # the broker never saw them: give their tags back
                        for s in sent:
                            channel.confirmations.pop(s.tag, None)
                        channel.delivery_tag -= len(sent)
        except asyncio.CancelledError:
            for item in batch:
                item.done.cancel()
            raise
        except Exception as exc:
            for item in batch:
                if not item.done.done():
                    item.done.set_exception(exc)
            return
        for s in sent:
            s.confirmation.add_done_callback(_relay_to(s.item.done))

    def _frame(self, channel: Channel, batch: list[_Pending]) -> list[_Sent]:
        """Frames for every result in ``batch``, with a confirmation registered for each one
        that could be encoded (one that cannot fails alone)."""
        out: list[_Sent] = []
        number = channel.number
        max_content = channel.max_content_size
        for item in batch:
            try:
                header = content_header(number, len(item.body), item.message_id, self._app_id)
            except ValueError as exc:
                item.done.set_exception(
                    PermanentError(f"the result's message_id cannot be sent over AMQP: {exc}")
                )
                continue
            frames = (
                self._publish_frame(number, item.routing_key)
                + header
                + body_frames(number, item.body, max_content)
            )
            channel.delivery_tag += 1
            confirmation = channel.create_future()
            channel.confirmations[channel.delivery_tag] = confirmation
            out.append(_Sent(channel.delivery_tag, frames, item, confirmation))
        return out

    def _publish_frame(self, channel: int, routing_key: str) -> bytes:
        key = (channel, routing_key)
        frame = self._publish_frames.get(key)
        if frame is None:
            method = Basic.Publish(exchange=self._exchange, routing_key=routing_key)
            frame = pamqp.frame.marshal(method, channel)
            if len(self._publish_frames) < 1024:  # labels are few; a bound all the same
                self._publish_frames[key] = frame
        return frame


def _relay_to(done: asyncio.Future[None]) -> Callable[[asyncio.Future[object]], None]:
    def relay(confirmation: asyncio.Future[object]) -> None:
        if done.done():
            return
        if confirmation.cancelled():
            done.cancel()
        elif (exc := confirmation.exception()) is not None:
            done.set_exception(exc)
        else:
            done.set_result(None)

    return relay
