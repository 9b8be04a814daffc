"""Sending messages to the input queue: JSONL lines as they are, or generated sample traffic."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import aio_pika
import orjson
from aio_pika.abc import AbstractConnection, AbstractExchange

from worker.amqp.connection import (
    CONNECT_ERRORS,
    CONNECT_TIMEOUT_S,
    CONNECTION_NAME,
    connect_failure,
    connect_once,
    describe_failure,
)
from worker.amqp.declaring import ensure_queue
from worker.core.errors import ConfigError


class BrokerUnreachable(Exception):
    """The broker could not be reached (it may be down); the message is one line for the user."""


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One message to send: its body as bytes and, when known, its AMQP ``message_id``."""

    body: bytes
    message_id: str | None


def from_jsonl_lines(lines: Iterable[str | bytes]) -> list[Outgoing]:
    """Each non-blank line is one message, sent byte for byte (malformed ones too: the worker
    dead-letters them); the AMQP ``message_id`` is taken from the body when it has one."""
    out: list[Outgoing] = []
    for line in lines:
        raw = line.encode() if isinstance(line, str) else line
        raw = raw.rstrip(b"\r\n")
        if not raw.strip():
            continue
        message_id: str | None = None
        try:
            parsed = orjson.loads(raw)
            if isinstance(parsed, dict) and isinstance(parsed.get("message_id"), str):
                message_id = parsed["message_id"]
        except orjson.JSONDecodeError:
            pass
        out.append(Outgoing(raw, message_id))
    return out


def from_bodies(bodies: Iterable[dict[str, object]]) -> list[Outgoing]:
    """Each body serialised as JSON, its ``message_id`` also set as the AMQP property."""
    return [
        Outgoing(orjson.dumps(b), str(b["message_id"]) if "message_id" in b else None)
        for b in bodies
    ]


async def publish(
    rabbitmq_url: str,
    queue: str,
    messages: list[Outgoing],
    *,
    rate_per_s: float = 0.0,
    window: int = 500,
    secrets: tuple[str, ...] = (),
    arguments: Mapping[str, str | int] | None = None,
) -> float:
    """Publish with confirms (``window`` at a time, or paced at ``rate_per_s``); returns seconds
    taken. The queue is used as it is if it exists, else declared with ``arguments`` (the input
    queue's, ``Topology.input_arguments``). ``ConfigError`` if the broker refuses the connection
    (a wrong password, say), ``BrokerUnreachable`` if it cannot be reached: one line each,
    ``secrets`` masked."""
    connection = await open_connection(rabbitmq_url, secrets)
    try:
        await ensure_queue(connection, queue, arguments or {}, look_up_type=False)
        channel = await connection.channel(publisher_confirms=True)
        exchange = channel.default_exchange
        started = time.perf_counter()
        if rate_per_s > 0:
            await _publish_paced(exchange, queue, messages, started, rate_per_s)
        else:
            await _publish_in_windows(exchange, queue, messages, window)
        return time.perf_counter() - started
    finally:
        await connection.close()


async def open_connection(url: str, secrets: tuple[str, ...] = ()) -> AbstractConnection:
    """A connection to ``url`` (to one of its addresses, tried in turn), or the reason there is
    none as ``ConfigError`` (refused) or ``BrokerUnreachable``, in one line."""
    try:
        return await connect_once(
            url, name=f"{CONNECTION_NAME} publish", timeout_s=CONNECT_TIMEOUT_S
        )
    except CONNECT_ERRORS as exc:
        line = describe_failure(url, exc, secrets)
        if connect_failure(exc).config:
            raise ConfigError(line) from None
        raise BrokerUnreachable(line) from None


async def _publish_paced(
    exchange: AbstractExchange,
    queue: str,
    messages: list[Outgoing],
    started: float,
    rate_per_s: float,
) -> None:
    """Send message ``i`` at ``started + i / rate_per_s``, then await every confirm."""
    pending: list[asyncio.Future[object]] = []
    for index, item in enumerate(messages):
        due = started + index / rate_per_s
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        pending.append(asyncio.ensure_future(exchange.publish(_message(item), routing_key=queue)))
    await asyncio.gather(*pending)


async def _publish_in_windows(
    exchange: AbstractExchange, queue: str, messages: list[Outgoing], window: int
) -> None:
    """As fast as confirms come: ``window`` messages in flight, the next window after them."""
    for start in range(0, len(messages), window):
        await asyncio.gather(
            *(
                exchange.publish(_message(item), routing_key=queue)
                for item in messages[start : start + window]
            )
        )


def _message(item: Outgoing) -> aio_pika.Message:
    return aio_pika.Message(
        item.body,
        message_id=item.message_id,
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )
