"""The broker as the worker uses it: declare the topology, consume, publish what the worker sends.

Results go out through ``worker.amqp.results`` (batched per loop turn, confirmed); retries and
dead letters are copies of the delivery published with confirms through aio-pika. The topology
(names, headers, attempt numbers) lives in ``worker.amqp.topology`` and the connection in
``worker.amqp.connection``; their public names are importable from here too.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Mapping
from typing import Any

import aio_pika
import aiormq
import orjson
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractRobustConnection
from aiormq.exceptions import ChannelInvalidStateError
from pamqp.commands import Basic

from worker.amqp.connection import (
    CONNECTION_NAME,
    RECONNECT_MAX_S,
    RECONNECT_MIN_S,
    BackoffRobustConnection,
    connect,
)
from worker.amqp.declaring import Found
from worker.amqp.delivery import Consuming, Delivery, OnDelivery, consume
from worker.amqp.fastpath import FastPath, current
from worker.amqp.results import ResultOut
from worker.amqp.setup import declare_topology
from worker.amqp.timeouts import ConsumerTimeouts
from worker.amqp.topology import (
    ATTEMPT_HEADER,
    DELIVERY_COUNT_HEADER,
    DETAIL_HEADER,
    DROPPED_HEADERS_HEADER,
    MAX_ATTEMPT_HEADER,
    REASON_HEADER,
    Topology,
    attempt_of,
    attempts_of,
)
from worker.core.classification import Classification
from worker.core.errors import PermanentError, PublishFailed
from worker.core.models import ChatMessage

__all__ = [
    "ATTEMPT_HEADER",
    "CONNECTION_NAME",
    "DETAIL_HEADER",
    "DROPPED_HEADERS_HEADER",
    "HEADER_ENCODING_ERRORS",
    "MAX_ATTEMPT_HEADER",
    "PUBLISH_ERRORS",
    "REASON_HEADER",
    "RECONNECT_MAX_S",
    "RECONNECT_MIN_S",
    "BackoffRobustConnection",
    "Broker",
    "Topology",
    "attempt_of",
    "attempts_of",
    "connect",
    "publish_failed",
]

# What pamqp raises for a header value it cannot encode (nothing was sent then).
HEADER_ENCODING_ERRORS: tuple[type[BaseException], ...] = (
    TypeError,
    ValueError,
    OverflowError,
    struct.error,
)
# What a publish raises when the broker or the connection fails it: worth a retry. Any other
# exception is a bug and propagates as one. aiormq raises ``ChannelInvalidStateError`` (a
# ``RuntimeError``, not an ``AMQPError``) for a channel that is closed or closing; aio-pika's
# ``AMQPError`` is aiormq's.
PUBLISH_ERRORS: tuple[type[BaseException], ...] = (
    aiormq.exceptions.AMQPError,
    ChannelInvalidStateError,
    ConnectionError,
    asyncio.TimeoutError,
)


def publish_failed(exc: BaseException) -> PublishFailed:
    """What a failed publish of a result is reported as (its type only: the text may hold data)."""
    return PublishFailed(f"publish of a result failed: {type(exc).__name__}")


class Broker:
    """Declares the topology and publishes results, retries and dead letters with confirms."""

    def __init__(
        self,
        connection: AbstractRobustConnection,
        topology: Topology,
        *,
        app_id: str = "",
        fast_path: FastPath | None = None,
    ) -> None:
        self.connection = connection
        self.topology = topology
        self.fast_path = fast_path or current()  # by default what this process installed
        self._app_id = app_id or None  # on every result: which replica published it
        self._channel: AbstractChannel | None = None
        self.found: list[Found] = []
        self._results_out: ResultOut | None = None

    async def declare(self) -> None:
        """Use or create the topology (``worker.amqp.declaring``), then open the publish channel."""
        self.found = await declare_topology(self.connection, self.topology)
        self._channel = await self.connection.channel(publisher_confirms=True)
        self._results_out = ResultOut(
            self._underlay,
            self.topology.results_exchange,
            app_id=self._app_id,
            fast_path=self.fast_path,
        )

    async def _underlay(self) -> aiormq.Channel:
        assert self._channel is not None, "declare() first"
        channel = await self._channel.get_underlay_channel()
        assert isinstance(channel, aiormq.Channel)
        return channel

    async def consume(
        self, prefetch: int, on_delivery: OnDelivery, *, timeouts: ConsumerTimeouts | None = None
    ) -> Consuming:
        """Consume the input queue on a channel of its own (so publishes never wait behind
        deliveries), handing each delivery to ``on_delivery`` (``worker.amqp.delivery``);
        ``timeouts`` hears of every close of that channel (``worker.amqp.timeouts``)."""
        channel = await self.connection.channel()
        if timeouts is not None:
            channel.close_callbacks.add(timeouts)
        await channel.set_qos(prefetch_count=prefetch)
        return await consume(channel, self.topology.input_queue, on_delivery)

    async def _publish(
        self, exchange: AbstractExchange, message: aio_pika.Message, key: str, *, mandatory: bool
    ) -> None:
        try:
            await exchange.publish(message, routing_key=key, mandatory=mandatory)
        except PUBLISH_ERRORS as exc:
            raise PublishFailed(
                f"publish to {exchange.name or 'default exchange'!r} failed: {type(exc).__name__}"
            ) from exc

    async def publish_result(
        self, message: ChatMessage, classification: Classification, cached: bool
    ) -> None:
        """Publish the result and wait for the broker's confirm."""
        try:
            await self.queue_result(message, classification, cached)
        except PUBLISH_ERRORS as exc:
            raise publish_failed(exc) from exc

    def queue_result(
        self,
        message: ChatMessage,
        classification: Classification,
        cached: bool,
        headers: Mapping[str, str] | None = None,
    ) -> asyncio.Future[object]:
        """Queue the result to leave with the others of this loop turn (``worker.amqp.results``),
        with ``headers`` (a trace context) if any; the future resolves on the broker's confirm, or
        fails with one of ``PUBLISH_ERRORS`` (``publish_failed`` names it) or ``PermanentError``.
        ``PermanentError`` at once when the result cannot be encoded."""
        assert self._results_out is not None, "declare() first"
        body = dict(message.body)
        body["classification"] = {
            "label": classification.label,
            "confidence": classification.confidence,
            "classifier": classification.classifier,
            "cached": cached,
        }
        try:
            encoded = orjson.dumps(body)
        except orjson.JSONEncodeError as exc:
            raise PermanentError(f"the result cannot be encoded: {exc}") from exc
        # Not mandatory: a result no binding takes goes to the alternate exchange (topology).
        return self._results_out.publish(encoded, classification.label, message.message_id, headers)

    def _copy(
        self, received: Delivery, headers: Mapping[str, Any], *, keep: bool = True
    ) -> aio_pika.Message:
        delivery = received.incoming
        return _Copy(
            delivery.body,
            headers={**_own(delivery.headers), **headers} if keep else dict(headers),
            content_type=delivery.content_type,
            content_encoding=delivery.content_encoding,
            message_id=delivery.message_id,
            correlation_id=delivery.correlation_id,
            reply_to=delivery.reply_to,
            priority=delivery.priority,
            timestamp=delivery.timestamp,
            type=delivery.type,
            app_id=delivery.app_id,
            # Not ``expiration`` (it would expire the dead letter) nor ``user_id`` (the broker
            # refuses one that is not the publisher's login).
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )

    async def _publish_copy(self, delivery: Delivery, headers: dict[str, Any], queue: str) -> None:
        """Publish a copy of ``delivery`` with ``headers`` added to its own, confirmed.

        A header the producer sent may not survive re-encoding (pamqp reads values it cannot
        write); then the copy carries only our headers, plus a note, rather than never leaving.
        """
        assert self._channel is not None, "declare() first"
        exchange = self._channel.default_exchange
        try:
            await self._publish(exchange, self._copy(delivery, headers), queue, mandatory=True)
        except HEADER_ENCODING_ERRORS as exc:
            headers = {**headers, DROPPED_HEADERS_HEADER: type(exc).__name__}
            await self._publish(
                exchange, self._copy(delivery, headers, keep=False), queue, mandatory=True
            )

    async def dead_letter(
        self, delivery: Delivery, reason: str, detail: str, attempts: int
    ) -> None:
        headers = {REASON_HEADER: reason, DETAIL_HEADER: detail[:500], ATTEMPT_HEADER: attempts}
        await self._publish_copy(delivery, headers, self.topology.dead_letter_queue)

    async def schedule_retry(self, delivery: Delivery, attempt: int, error: str) -> None:
        """Park a copy for the delay of ``attempt``; it comes back as attempt ``attempt + 1``."""
        headers = {ATTEMPT_HEADER: attempt + 1, DETAIL_HEADER: error[:500]}
        await self._publish_copy(delivery, headers, self.topology.retry_queue(attempt))

    async def send_to_back(self, delivery: Delivery) -> None:
        """A copy at the back of the input queue, headers (the attempt) unchanged: a message
        held while the classifier was paused, making way for the deliveries behind it."""
        await self._publish_copy(delivery, {}, self.topology.input_queue)

    @property
    def connected(self) -> bool:
        return self.connection.connected.is_set() and not self.connection.is_closed


def _own(headers: Mapping[str, Any] | None) -> dict[str, Any]:
    """The delivery's headers but the broker's delivery count: the copy is a new message, and a
    count copied into it would read as returns it never had."""
    return {k: v for k, v in (headers or {}).items() if k != DELIVERY_COUNT_HEADER}


class _WithoutMessageId(Basic.Properties):
    """Properties that go on the wire without a ``message_id``, whatever is set on them later.

    aiormq's ``basic_publish`` gives every publish lacking one a random ``message_id`` (its key for
    matching a ``basic.return`` to the publish); a copy of a delivery that had none keeps none.
    """

    def marshal(self) -> bytes:
        assigned, self.message_id = self.message_id, None
        try:
            return super().marshal()
        finally:
            self.message_id = assigned


class _Copy(aio_pika.Message):
    """A retry or dead-letter copy: its properties are the delivery's, an absent
    ``message_id`` included."""

    @property
    def properties(self) -> Basic.Properties:
        properties = super().properties
        if self.message_id is not None:
            return properties
        copy = _WithoutMessageId()
        for name, value in properties:
            setattr(copy, name, value)
        return copy
