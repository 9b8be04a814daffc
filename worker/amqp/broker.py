"""RabbitMQ: the connection, the topology every replica declares, and what the worker publishes.

Topology (all durable):
- ``INPUT_QUEUE``: the messages, consumed by every replica;
- ``RESULTS_EXCHANGE`` (topic): one result per unique message, routing key = the label;
- ``DEAD_LETTER_QUEUE``: messages that cannot be processed, with ``x-death-reason`` and detail;
- ``{INPUT_QUEUE}.retry.{delay}ms``: one holding queue per retry delay; a message waits there for
  its TTL, then RabbitMQ dead-letters it back to the input queue (no hot requeue loop).

The connection is aio-pika's robust one (channels, queues and consumers are restored after a
reconnection), reconnecting with backoff: at once, then after half as long as the broker has been
away, between ``RECONNECT_MIN_S`` and ``RECONNECT_MAX_S``. Deliveries unacknowledged when the
connection dropped are redelivered by the broker; the claim protocol keeps them from being
processed twice.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aio_pika
import aiormq
import orjson
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractRobustConnection,
)

from worker.amqp.delivery import Delivery, DirectChannel, DirectQueue
from worker.amqp.fastpath import frames
from worker.amqp.results import ResultOut
from worker.classification.classifiers.base import Classification
from worker.core.errors import PermanentError, PublishFailed
from worker.core.models import ChatMessage

ATTEMPT_HEADER = "x-neiromatrius-attempt"
REASON_HEADER = "x-death-reason"
DETAIL_HEADER = "x-death-detail"
MAX_ATTEMPT_HEADER = 1_000  # a forged attempt header must not make the delay computation explode
DROPPED_HEADERS_HEADER = "x-neiromatrius-dropped-headers"
# What pamqp raises for a header value it cannot encode (nothing was sent then).
HEADER_ENCODING_ERRORS: tuple[type[BaseException], ...] = (
    TypeError,
    ValueError,
    OverflowError,
    struct.error,
)
RECONNECT_MIN_S = 0.5
RECONNECT_MAX_S = 15.0
CONNECTION_NAME = "neiromatrius-worker"
PUBLISH_ERRORS: tuple[type[BaseException], ...] = (
    aio_pika.exceptions.AMQPError,
    aiormq.exceptions.AMQPError,
    ConnectionError,
    asyncio.TimeoutError,
    RuntimeError,
)


def publish_failed(exc: BaseException) -> PublishFailed:
    """What a failed publish of a result is reported as (its type only: the text may hold data)."""
    return PublishFailed(f"publish of a result failed: {type(exc).__name__}")


@dataclass(frozen=True, slots=True)
class Topology:
    input_queue: str
    results_exchange: str
    dead_letter_queue: str
    retry_base_delay_s: float
    max_attempts: int

    def retry_delay_ms(self, attempt: int) -> int:
        """Delay before attempt ``attempt + 1``: the base, doubled after each failure, at most 1 h."""
        doublings = min(max(attempt, 1), 64) - 1
        return int(min(self.retry_base_delay_s * 2**doublings, 3_600) * 1000)

    def retry_queue(self, attempt: int) -> str:
        return f"{self.input_queue}.retry.{self.retry_delay_ms(attempt)}ms"


def attempt_of(message: Delivery) -> int:
    """Which attempt this delivery is by its header (1 for a message never retried)."""
    value = (message.headers or {}).get(ATTEMPT_HEADER, 1)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        return 1
    return min(value, MAX_ATTEMPT_HEADER)


class BackoffRobustConnection(aio_pika.RobustConnection):
    """aio-pika's robust connection, waiting longer between attempts the longer the broker is away.

    aio-pika sleeps ``reconnect_interval`` after each failed attempt; here that value is computed
    when read: the configured minimum while connected, then half the outage so far (at most
    ``RECONNECT_MAX_S``), so attempts come at roughly 1.5 times the previous delay.
    """

    CHANNEL_CLASS = DirectChannel  # its queues can hand deliveries over raw (worker.amqp.delivery)
    _min_interval_s: float = RECONNECT_MIN_S
    _lost_at: float | None = None

    @property
    def reconnect_interval(self) -> float:
        if self.connected.is_set():
            self._lost_at = None
            return self._min_interval_s
        now = time.monotonic()
        if self._lost_at is None:
            self._lost_at = now
        return min(RECONNECT_MAX_S, max(self._min_interval_s, (now - self._lost_at) / 2))

    @reconnect_interval.setter
    def reconnect_interval(self, value: float) -> None:
        self._min_interval_s = float(value)


async def connect(url: str, *, name: str = CONNECTION_NAME) -> AbstractRobustConnection:
    """A robust connection named ``name`` (shown by ``rabbitmqctl list_connections``), reading
    frames with ``worker.amqp.fastpath.frames``."""
    frames.install()
    extra: dict[str, Any] = {}
    if "reconnect_interval" not in parse_qs(urlsplit(url).query):
        extra["reconnect_interval"] = RECONNECT_MIN_S
    connection: AbstractRobustConnection = await aio_pika.connect_robust(
        url,
        client_properties={"connection_name": name},
        connection_class=BackoffRobustConnection,
        **extra,
    )
    return connection


class Broker:
    """Declares the topology and publishes results, retries and dead letters with confirms."""

    def __init__(
        self, connection: AbstractRobustConnection, topology: Topology, *, app_id: str = ""
    ) -> None:
        self.connection = connection
        self.topology = topology
        self._app_id = app_id or None  # on every result: which replica published it
        self._channel: AbstractChannel | None = None
        self._results: AbstractExchange | None = None
        self._results_out: ResultOut | None = None

    async def declare(self) -> None:
        channel = await self.connection.channel(publisher_confirms=True)
        t = self.topology
        await channel.declare_queue(t.input_queue, durable=True)
        await channel.declare_queue(t.dead_letter_queue, durable=True)
        for attempt in range(1, t.max_attempts):
            await channel.declare_queue(
                t.retry_queue(attempt),
                durable=True,
                arguments={
                    "x-message-ttl": t.retry_delay_ms(attempt),
                    "x-dead-letter-exchange": "",
                    "x-dead-letter-routing-key": t.input_queue,
                },
            )
        self._results = await channel.declare_exchange(
            t.results_exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        self._channel = channel
        self._results_out = ResultOut(self._underlay, t.results_exchange, app_id=self._app_id)

    async def _underlay(self) -> aiormq.Channel:
        assert self._channel is not None, "declare() first"
        channel = await self._channel.get_underlay_channel()
        assert isinstance(channel, aiormq.Channel)
        return channel

    async def consumer_queue(self, prefetch: int) -> DirectQueue:
        """A channel of its own for consuming, so publishes never wait behind deliveries."""
        channel = await self.connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        queue = await channel.declare_queue(self.topology.input_queue, durable=True)
        assert isinstance(queue, DirectQueue), "connect() makes DirectChannels"
        return queue

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
        self, message: ChatMessage, classification: Classification, cached: bool
    ) -> asyncio.Future[object]:
        """Queue the result to leave with the others of this loop turn (``worker.amqp.results``);
        the future resolves on the broker's confirm, or fails with one of ``PUBLISH_ERRORS``
        (``publish_failed`` names it) or ``PermanentError``. ``PermanentError`` at once when the
        result cannot be encoded."""
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
        # Not mandatory: with nobody bound to the results exchange, results are discarded.
        return self._results_out.publish(encoded, classification.label, message.message_id)

    def _copy(
        self, received: Delivery, headers: Mapping[str, Any], *, keep: bool = True
    ) -> aio_pika.Message:
        delivery = received.incoming
        return aio_pika.Message(
            delivery.body,
            headers={**(delivery.headers or {}), **headers} if keep else dict(headers),
            content_type=delivery.content_type,
            content_encoding=delivery.content_encoding,
            message_id=delivery.message_id,
            correlation_id=delivery.correlation_id,
            timestamp=delivery.timestamp,
            type=delivery.type,
            app_id=delivery.app_id,
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

    @property
    def connected(self) -> bool:
        return self.connection.connected.is_set() and not self.connection.is_closed
