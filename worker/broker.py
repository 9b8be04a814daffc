"""RabbitMQ: the connection, the topology every replica declares, and what the worker publishes.

Topology (all durable):
- ``INPUT_QUEUE``: the messages, consumed by every replica;
- ``RESULTS_EXCHANGE`` (topic): one result per unique message, routing key = the label;
- ``DEAD_LETTER_QUEUE``: messages that cannot be processed, with ``x-death-reason`` and detail;
- ``{INPUT_QUEUE}.retry.{delay}ms``: one holding queue per retry delay; a message waits there for
  its TTL, then RabbitMQ dead-letters it back to the input queue (no hot requeue loop).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aio_pika
import aiormq
import orjson
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from pamqp.commands import Basic

from worker.classifiers.base import Classification
from worker.errors import PublishFailed
from worker.models import ChatMessage

ATTEMPT_HEADER = "x-neiromatrius-attempt"
REASON_HEADER = "x-death-reason"
DETAIL_HEADER = "x-death-detail"
PUBLISH_ERRORS: tuple[type[BaseException], ...] = (
    aio_pika.exceptions.AMQPError,
    aiormq.exceptions.AMQPError,
    ConnectionError,
    asyncio.TimeoutError,
    RuntimeError,
)


@dataclass(frozen=True, slots=True)
class Topology:
    input_queue: str
    results_exchange: str
    dead_letter_queue: str
    retry_base_delay_s: float
    max_attempts: int

    def retry_delay_ms(self, attempt: int) -> int:
        """Delay before attempt ``attempt + 1``: the base, doubled after each failure, at most 1 h."""
        return int(min(self.retry_base_delay_s * 2 ** (attempt - 1), 3_600) * 1000)

    def retry_queue(self, attempt: int) -> str:
        return f"{self.input_queue}.retry.{self.retry_delay_ms(attempt)}ms"


def attempt_of(message: AbstractIncomingMessage) -> int:
    """Which attempt this delivery is (1 for a message never retried)."""
    value = (message.headers or {}).get(ATTEMPT_HEADER, 1)
    return value if isinstance(value, int) and value >= 1 else 1


async def connect(url: str) -> AbstractRobustConnection:
    """A robust connection: aio-pika reconnects and restores channels, queues and consumers."""
    return await aio_pika.connect_robust(
        url, client_properties={"connection_name": "neiromatrius-worker"}
    )


class Broker:
    """Declares the topology and publishes results, retries and dead letters with confirms."""

    def __init__(self, connection: AbstractRobustConnection, topology: Topology) -> None:
        self.connection = connection
        self.topology = topology
        self._channel: AbstractChannel | None = None
        self._results: AbstractExchange | None = None

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

    async def consumer_queue(self, prefetch: int) -> AbstractQueue:
        """A channel of its own for consuming, so publishes never wait behind deliveries."""
        channel = await self.connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        return await channel.declare_queue(self.topology.input_queue, durable=True)

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
        """Publish the result and wait for the broker's confirm.

        The hot path talks to the underlying aiormq channel directly: building an aio-pika
        ``Message`` per result cost more than the rest of the publish.
        """
        assert self._channel is not None, "declare() first"
        assert self._results is not None, "declare() first"
        body = dict(message.body)
        body["classification"] = {
            "label": classification.label,
            "confidence": classification.confidence,
            "classifier": classification.classifier,
            "cached": cached,
        }
        properties = Basic.Properties(
            message_id=message.message_id,
            content_type="application/json",
            delivery_mode=2,
        )
        try:
            channel = await self._channel.get_underlay_channel()
            # Not mandatory: with nobody bound to the results exchange, results are discarded.
            await channel.basic_publish(
                orjson.dumps(body),
                exchange=self._results.name,
                routing_key=classification.label,
                properties=properties,
                mandatory=False,
            )
        except PUBLISH_ERRORS as exc:
            raise PublishFailed(f"publish of a result failed: {type(exc).__name__}") from exc

    def _copy(
        self, delivery: AbstractIncomingMessage, headers: Mapping[str, Any]
    ) -> aio_pika.Message:
        return aio_pika.Message(
            delivery.body,
            headers={**(delivery.headers or {}), **headers},
            content_type=delivery.content_type,
            content_encoding=delivery.content_encoding,
            message_id=delivery.message_id,
            correlation_id=delivery.correlation_id,
            timestamp=delivery.timestamp,
            type=delivery.type,
            app_id=delivery.app_id,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )

    async def dead_letter(
        self, delivery: AbstractIncomingMessage, reason: str, detail: str, attempts: int
    ) -> None:
        assert self._channel is not None, "declare() first"
        headers = {REASON_HEADER: reason, DETAIL_HEADER: detail[:500], ATTEMPT_HEADER: attempts}
        await self._publish(
            self._channel.default_exchange,
            self._copy(delivery, headers),
            self.topology.dead_letter_queue,
            mandatory=True,
        )

    async def schedule_retry(
        self, delivery: AbstractIncomingMessage, attempt: int, error: str
    ) -> None:
        """Park a copy for the delay of ``attempt``; it comes back as attempt ``attempt + 1``."""
        assert self._channel is not None, "declare() first"
        headers = {ATTEMPT_HEADER: attempt + 1, DETAIL_HEADER: error[:500]}
        await self._publish(
            self._channel.default_exchange,
            self._copy(delivery, headers),
            self.topology.retry_queue(attempt),
            mandatory=True,
        )

    @property
    def connected(self) -> bool:
        return self.connection.connected.is_set() and not self.connection.is_closed
