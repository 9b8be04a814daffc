"""One delivery as the worker reads it, and consuming the input queue into such deliveries.

``Delivery`` holds the few fields the hot path reads, taken as they are; the rare path that
publishes a copy of the message (a retry, a dead letter) gets aio-pika's full view
(``incoming``). ``consume`` hands each delivery to a synchronous function, in arrival order:

- on the fast path (a connection made with ``worker.amqp.fastpath.inline``'s channels), the
  channel's reader calls it directly with aiormq's raw delivery, no ``IncomingMessage`` and no
  task per delivery;
- on the stock libraries, through aio-pika's own consumer callback (``IncomingMessage``).

Either way the consumer is robust: aio-pika registers it again on the new channel after a
reconnection.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import structlog
from aio_pika.abc import AbstractChannel as AbstractPikaChannel
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue, ConsumerTag
from aio_pika.message import IncomingMessage
from aiormq.abc import AbstractChannel, DeliveredMessage
from aiormq.exceptions import ChannelInvalidStateError

from worker.amqp.fastpath.inline import DirectQueue

log = structlog.get_logger("worker.amqp.delivery")


class Delivery:
    """What the worker reads of one delivery; aio-pika's ``IncomingMessage`` only on demand."""

    __slots__ = (
        "_channel",
        "_incoming",
        "_raw",
        "body",
        "delivery_tag",
        "headers",
        "message_id",
        "redelivered",
    )

    def __init__(self, raw: DeliveredMessage) -> None:
        self._raw: DeliveredMessage | None = raw
        self._incoming: AbstractIncomingMessage | None = None
        self._channel: AbstractChannel = raw.channel
        self.body: bytes = raw.body
        self.delivery_tag: int = raw.delivery_tag or 0
        self.redelivered = bool(raw.redelivered)
        properties = raw.header.properties
        self.message_id: str | None = properties.message_id
        self.headers: Mapping[str, Any] = properties.headers or {}

    @classmethod
    def of_incoming(cls, message: AbstractIncomingMessage) -> Delivery:
        """The same fields, from aio-pika's view (the stock path)."""
        delivery = cls.__new__(cls)
        delivery._raw = None
        delivery._incoming = message
        delivery._channel = message.channel  # open: it just delivered
        delivery.body = message.body
        delivery.delivery_tag = message.delivery_tag or 0
        delivery.redelivered = bool(message.redelivered)
        delivery.message_id = message.message_id
        delivery.headers = message.headers or {}
        return delivery

    @property
    def channel(self) -> AbstractChannel:
        """The channel it came on; ``ChannelInvalidStateError`` once that channel closed (its
        deliveries are then redelivered by the broker)."""
        if self.stale:
            raise ChannelInvalidStateError("the channel of this delivery is closed")
        return self._channel

    @property
    def stale(self) -> bool:
        """Its channel closed (the connection was lost): the broker redelivers it, so it must be
        neither claimed nor counted here."""
        return bool(self._channel.is_closed)

    @property
    def incoming(self) -> AbstractIncomingMessage:
        """aio-pika's view of the same delivery, built the first time it is asked for."""
        if self._incoming is None:
            assert self._raw is not None  # one of the two is always there
            self._incoming = IncomingMessage(self._raw, no_ack=False)
        return self._incoming


OnDelivery = Callable[[Delivery], None]


@dataclass(frozen=True, slots=True)
class Consuming:
    """A consumer of one queue: ``inline`` when the channel's reader hands deliveries over."""

    queue: AbstractQueue
    consumer_tag: ConsumerTag
    inline: bool

    async def cancel(self) -> None:
        await self.queue.cancel(self.consumer_tag)


class _Wrap:
    """The raw delivery as a ``Delivery``, for the inline reader (a plain synchronous call)."""

    __slots__ = ("on_delivery",)

    def __init__(self, on_delivery: OnDelivery) -> None:
        self.on_delivery = on_delivery

    def __call__(self, raw: DeliveredMessage) -> None:
        self.on_delivery(Delivery(raw))


async def consume(
    channel: AbstractPikaChannel, queue_name: str, on_delivery: OnDelivery
) -> Consuming:
    """Consume ``queue_name`` on ``channel``, handing each delivery to ``on_delivery``; inline
    when the channel's queues can (the fast path's channels), else aio-pika's own way."""
    # Passive: the queue exists (declared, or found as it is, by ``worker.amqp.setup``), and a
    # declaration with other arguments would fail; aio-pika restores it passively too.
    queue = await channel.declare_queue(queue_name, passive=True)
    if isinstance(queue, DirectQueue):
        tag = await queue.consume(_Wrap(on_delivery), raw=True)
        return Consuming(queue, tag, inline=True)

    async def on_message(message: AbstractIncomingMessage) -> None:
        try:
            delivery = Delivery.of_incoming(message)
        except ChannelInvalidStateError:  # closed before its task ran: the broker redelivers it
            return
        try:
            on_delivery(delivery)
        except Exception:  # like the inline reader: this delivery stays unsettled, others go on
            log.exception("consumer_callback_failed")

    tag = await queue.consume(on_message)
    return Consuming(queue, tag, inline=False)
