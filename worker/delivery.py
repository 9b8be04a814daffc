"""One delivery as the worker reads it, and the queue that hands deliveries over that way.

aio-pika turns every delivery into an ``IncomingMessage`` (a dozen properties decoded and
validated) and schedules the consumer callback through a future of its own; at thousands of
messages a second that cost as much as the rest of a message's work. ``DirectQueue.consume(...,
raw=True)`` registers the callback with aiormq directly, and the consumer wraps each delivery in a
``Delivery``: the few fields the hot path reads, taken as they are. The rare path that publishes a
copy of the message (a retry, a dead letter) still gets aio-pika's full view (``incoming``).

The queue stays robust: like aio-pika's own consumers, a raw consumer is registered again on the
new channel after a reconnection (``RobustQueue.restore`` calls ``consume`` with what was kept).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, ConsumerTag
from aio_pika.message import IncomingMessage
from aiormq.abc import AbstractChannel, DeliveredMessage
from aiormq.exceptions import ChannelInvalidStateError


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
        if self._raw.channel.is_closed:
            raise ChannelInvalidStateError("the channel of this delivery is closed")
        return self._raw.channel

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
        answer = await channel.basic_consume(
            queue=self.name,
            consumer_callback=callback,
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
