"""Declaring what the worker uses on the broker without ever refusing what is already there.

A queue or exchange that exists is used as it is, whatever its arguments: an operator's own
declaration (a quorum queue, a delivery limit) or a policy must never stop a replica. So each one
is first declared passively; only a missing one is declared with the worker's arguments. Each
declaration runs on a throwaway aiormq channel: the broker closes a channel on a failed declare
(404 for a missing queue, 406 for other arguments), and a robust aio-pika channel would reopen
itself and declare again whatever it declared before.

What an existing queue is cannot be asked over AMQP 0-9-1 (``queue.declare-ok`` carries counts
only), but the broker names the first argument that differs when a declaration does not match,
with its current value: ``type_of`` declares with an ``x-queue-type`` no broker knows and adopts
each other argument the broker names, until the answer is about ``x-queue-type`` itself.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

import aiormq
from aio_pika.abc import AbstractConnection
from aiormq.abc import AbstractChannel
from aiormq.exceptions import AMQPError, ChannelNotFoundEntity, ChannelPreconditionFailed
from pamqp.common import FieldValue

PROBE_TYPE = "neiromatrius-probe"  # never a queue type: the probe can never create a queue
MAX_PROBES = 12
# "inequivalent arg 'x-queue-type' for queue 'q' in vhost '/': received 'a' but current is 'b'"
_INEQUIVALENT = re.compile(
    r"inequivalent arg '(?P<arg>[^']+)' for \w+ '.*' in vhost '.*': received .* but current is "
    r"(?:none|the value '(?P<value>.*)' of type '(?P<type>\w+)'|'(?P<plain>.*)')$"
)
_INTEGER_TYPES = frozenset({"byte", "short", "signedint", "long", "unsignedbyte", "unsignedshort"})


@dataclass(frozen=True, slots=True)
class Found:
    """A queue or exchange as the worker found it: created now, or there already."""

    name: str
    created: bool
    kind: str  # a queue's type (classic, quorum, stream, unknown) or an exchange's AE check
    messages: int = 0


@dataclass(frozen=True, slots=True)
class Differs:
    """What the broker said differs: an argument and its current value (``None``: not set)."""

    argument: str
    current: str | int | None


def differs(exc: BaseException) -> Differs | None:
    """The argument a failed declaration named, if the broker's words are the known ones."""
    found = _INEQUIVALENT.search(str(exc))
    if found is None:
        return None
    if found["plain"] is not None:
        return Differs(found["arg"], found["plain"])
    if found["value"] is None:
        return Differs(found["arg"], None)
    value: str | int = found["value"]
    if found["type"] in _INTEGER_TYPES:
        with contextlib.suppress(ValueError):
            value = int(found["value"])
    return Differs(found["arg"], value)


@contextlib.asynccontextmanager
async def throwaway(connection: AbstractConnection) -> AsyncIterator[AbstractChannel]:
    """A plain aiormq channel on ``connection``, closed afterwards unless the broker closed it."""
    if connection.transport is None:
        raise aiormq.exceptions.ConnectionClosed(320, "the connection is not open")
    channel = await connection.transport.connection.channel()
    try:
        yield channel
    finally:
        if not channel.is_closed:
            with contextlib.suppress(AMQPError, ConnectionError, RuntimeError):
                await channel.close()


async def ensure_queue(
    connection: AbstractConnection,
    name: str,
    arguments: Mapping[str, str | int],
    *,
    look_up_type: bool = True,
) -> Found:
    """``name`` as it exists (its type looked up, unless ``look_up_type`` is false), or declared
    now, durable, with ``arguments``."""
    for _ in range(2):
        try:
            async with throwaway(connection) as channel:
                ok = await channel.queue_declare(name, passive=True)
        except ChannelNotFoundEntity:
            try:
                async with throwaway(connection) as channel:
                    await channel.queue_declare(name, durable=True, arguments=dict(arguments))
            except ChannelPreconditionFailed:
                continue  # declared meanwhile by someone else, otherwise: use it as it is
            return Found(name, True, str(arguments.get("x-queue-type", "classic")))
        kind = await type_of(connection, name) if look_up_type else "unknown"
        return Found(name, False, kind, ok.message_count or 0)
    raise ChannelPreconditionFailed(f"queue {name!r} cannot be declared nor found")


async def type_of(connection: AbstractConnection, name: str) -> str:
    """The type of the existing queue ``name``: classic, quorum, stream, or unknown."""
    probe: dict[str, FieldValue] = {"x-queue-type": PROBE_TYPE}
    for _ in range(MAX_PROBES):
        try:
            async with throwaway(connection) as channel:
                await channel.queue_declare(name, durable=True, arguments=probe)
        except ChannelPreconditionFailed as exc:
            found = differs(exc)
            if found is None:
                return "unknown"
            if found.argument == "x-queue-type":
                return str(found.current or "classic")  # none: the broker's default, classic
            if found.current is None:
                probe.pop(found.argument, None)
            else:
                probe[found.argument] = found.current
        except ChannelNotFoundEntity:
            return "unknown"  # deleted meanwhile: the unknown type cannot create it
        else:
            return "unknown"
    return "unknown"


async def ensure_exchange(
    connection: AbstractConnection, name: str, kind: str, arguments: Mapping[str, str | int]
) -> Found:
    """``name`` as it exists, or declared now, durable, of type ``kind`` with ``arguments``.

    ``Found.kind`` says whether an existing one has ``arguments``: ``"same"``, or what differs
    (``"alternate-exchange=none"``: declared without one; a policy may still give it one)."""
    try:
        async with throwaway(connection) as channel:
            await channel.exchange_declare(name, passive=True)
    except ChannelNotFoundEntity:
        async with throwaway(connection) as channel:
            await channel.exchange_declare(
                name, exchange_type=kind, durable=True, arguments=dict(arguments)
            )
        return Found(name, True, "same")
    try:
        async with throwaway(connection) as channel:
            await channel.exchange_declare(
                name, exchange_type=kind, durable=True, arguments=dict(arguments)
            )
    except ChannelPreconditionFailed as exc:
        found = differs(exc)
        if found is None:
            return Found(name, False, "different")
        return Found(name, False, f"{found.argument}={found.current or 'none'}")
    return Found(name, False, "same")


async def bind_queue(connection: AbstractConnection, queue: str, exchange: str) -> None:
    """Bind ``queue`` to ``exchange`` for every routing key (binding again changes nothing)."""
    async with throwaway(connection) as channel:
        await channel.queue_bind(queue, exchange, routing_key="#")
