"""One delivery as the worker reads it, and the queue that hands deliveries over that way.

aio-pika turns every delivery into an ``IncomingMessage`` (a dozen properties decoded and
validated) and schedules the consumer callback through a future of its own; at thousands of
messages a second that cost as much as the rest of a message's work. ``DirectQueue.consume(...,
raw=True)`` registers the callback with aiormq directly, and the consumer wraps each delivery in a
``Delivery``: the few fields the hot path reads, taken as they are. The rare path that publishes a
copy of the message (a retry, a dead letter) still gets aio-pika's full view (``incoming``).

aiormq also runs every consumer callback in a task of its own, one per delivery. The worker's callback
is synchronous and only queues the delivery, so the task cost more than the callback:
``deliver_inline`` has the channel's reader call it directly instead (it relies on two aiormq
internals, ``_on_deliver_frame`` and the content reader; aiormq is pinned, and
``tests/integration/test_delivery.py`` checks the behaviour).

The queue stays robust: like aio-pika's own consumers, a raw consumer is registered again on the
new channel after a reconnection (``RobustQueue.restore`` calls ``consume`` with what was kept).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aio_pika
import structlog
from aio_pika.abc import AbstractIncomingMessage, ConsumerTag
from aio_pika.message import IncomingMessage
from aiormq.abc import AbstractChannel, DeliveredMessage
from aiormq.exceptions import ChannelInvalidStateError

log = structlog.get_logger("worker.amqp.delivery")

Inline = Callable[[DeliveredMessage], None]


class Delivery:
    """What the worker reads of one delivery; aio-pika's ``IncomingMessage`` only on demand."""

    __slots__ = (
        "_incoming",
        "_raw",
        "body",
        "delivery_tag",
        "headers",
        "message_id",
        "redelivered",
    )

    def __init__(self, raw: DeliveredMessage) -> None:
        self._raw = raw
        self._incoming: AbstractIncomingMessage | None = None
        self.body: bytes = raw.body
        self.delivery_tag: int = raw.delivery_tag or 0
        self.redelivered = bool(raw.redelivered)
        properties = raw.header.properties
        self.message_id: str | None = properties.message_id
        self.headers: Mapping[str, Any] = properties.headers or {}

    @property
    def channel(self) -> AbstractChannel:
        """The channel it came on; ``ChannelInvalidStateError`` once that channel closed (its
        deliveries are then redelivered by the broker)."""
        if self.stale:
            raise ChannelInvalidStateError("the channel of this delivery is closed")
        return self._raw.channel

    @property
    def stale(self) -> bool:
        """Its channel closed (the connection was lost): the broker redelivers it, so it must be
        neither claimed nor counted here."""
        return bool(self._raw.channel.is_closed)

    @property
    def incoming(self) -> AbstractIncomingMessage:
        """aio-pika's view of the same delivery, built the first time it is asked for."""
        if self._incoming is None:
            self._incoming = IncomingMessage(self._raw, no_ack=False)
        return self._incoming


class DirectQueue(aio_pika.RobustQueue):
    """A robust queue whose ``consume(..., raw=True)`` hands aiormq's deliveries to the callback."""

    async def consume(
        self,
        callback: Callable[[Any], Any],
        no_ack: bool = False,
        exclusive: bool = False,
        arguments: Any = None,
        consumer_tag: ConsumerTag | None = None,
        timeout: Any = None,  # noqa: ASYNC109 (RobustQueue.consume's signature)
        robust: bool = True,
        raw: bool = False,
    ) -> ConsumerTag:
        if not raw:
            return await super().consume(
                callback, no_ack, exclusive, arguments, consumer_tag, timeout, robust
            )
        channel = await self.channel.get_underlay_channel()
        deliver_inline(channel)
        answer = await channel.basic_consume(
            queue=self.name,
            consumer_callback=inline_callback(callback),
            exclusive=exclusive,
            no_ack=no_ack,
            arguments=arguments,
            consumer_tag=consumer_tag,
            timeout=timeout,
        )
        if answer.consumer_tag is None:
            raise RuntimeError("the broker answered basic.consume without a consumer tag")
        if robust:  # what RobustQueue.restore passes back to consume after a reconnection
            self._consumers[answer.consumer_tag] = dict(
                callback=callback, no_ack=no_ack, exclusive=exclusive, arguments=arguments, raw=True
            )
        return answer.consumer_tag


class DirectChannel(aio_pika.RobustChannel):
    """A robust channel whose queues are ``DirectQueue``s."""

    QUEUE_CLASS = DirectQueue


class _InlineCallback:
    """A synchronous consumer callback that the channel's reader calls directly."""

    __slots__ = ("callback",)

    def __init__(self, callback: Inline) -> None:
        self.callback = callback

    def __call__(self, message: DeliveredMessage) -> None:
        self.callback(message)


def deliver_inline(channel: AbstractChannel) -> None:
    """Have ``channel``'s reader call the consumers registered through ``inline_callback``
    directly with each delivery, instead of in a new task per delivery (aiormq's way, which every
    other consumer of the channel keeps). Installed before the consumer is, so that no delivery
    arriving right after ``basic.consume-ok`` goes the other way."""
    if getattr(channel, "_delivers_inline", False):
        return
    channel._on_deliver_frame = _inline_deliver_frame(channel)  # type: ignore[attr-defined]
    channel._delivers_inline = True  # type: ignore[attr-defined]


def inline_callback(callback: Inline) -> Callable[[DeliveredMessage], Any]:
    """``callback`` marked for ``deliver_inline``, typed as ``basic_consume`` wants (it wraps any
    callable with ``awaitable``; the inline reader unwraps it and calls it directly)."""
    return _InlineCallback(callback)


def _inline_deliver_frame(channel: Any) -> Callable[[Any], Awaitable[None]]:
    own_way = channel._on_deliver_frame
    read_header = channel._Channel__get_content_header
    read_content = channel._read_content
    consumers = channel.consumers

    async def on_deliver_frame(frame: Any) -> None:
        # aiormq keeps ``awaitable(callback)``, a ``functools.wraps`` wrapper of the callback.
        callback = getattr(consumers.get(frame.consumer_tag), "__wrapped__", None)
        if not isinstance(callback, _InlineCallback):
            await own_way(frame)
            return
        message = await read_content(frame, await read_header())
        try:
            callback(message)
        except Exception:  # the channel's reader must go on: this delivery stays unsettled
            log.exception("consumer_callback_failed")

    return on_deliver_frame
