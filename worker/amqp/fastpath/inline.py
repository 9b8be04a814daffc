"""Inline deliveries: aiormq's deliveries handed to a plain function by the channel's reader.

aio-pika turns every delivery into an ``IncomingMessage`` (a dozen properties decoded and
validated) and schedules the consumer callback through a future of its own, and aiormq runs every
consumer callback in a task of its own, one per delivery; at thousands of messages a second that
cost as much as the rest of a message's work. Here ``DirectQueue.consume(..., raw=True)`` registers
the callback with aiormq directly, and ``deliver_inline`` has the channel's reader call it with
aiormq's ``DeliveredMessage`` instead of starting a task.

aiormq and aio-pika internals relied on (``worker.amqp.fastpath.switch`` checks each at start-up):
the channel's ``_on_deliver_frame`` (replaced per channel, an instance attribute the reader looks
up), its name-mangled ``_Channel__get_content_header`` and ``_read_content`` (the content reader),
its ``consumers`` table holding ``aiormq.tools.awaitable(callback)`` (whose ``__wrapped__`` is the
callback), and aio-pika's ``RobustQueue._consumers``, the table ``RobustQueue.restore`` registers
consumers again from after a reconnection.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
import structlog
from aio_pika.abc import ConsumerTag
from aiormq.abc import AbstractChannel, DeliveredMessage

log = structlog.get_logger("worker.amqp.fastpath.inline")

Inline = Callable[[DeliveredMessage], None]


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


def delivers_inline(channel: AbstractChannel) -> bool:
    """Whether ``channel``'s reader calls inline consumers directly (``deliver_inline``)."""
    return bool(getattr(channel, "_delivers_inline", False))


def deliver_inline(channel: AbstractChannel) -> None:
    """Have ``channel``'s reader call the consumers registered through ``inline_callback``
    directly with each delivery, instead of in a new task per delivery (aiormq's way, which every
    other consumer of the channel keeps). Installed before the consumer is, so that no delivery
    arriving right after ``basic.consume-ok`` goes the other way."""
    if delivers_inline(channel):
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
