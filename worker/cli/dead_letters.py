"""``neiromatrius-worker dead-letters``: what is in ``DEAD_LETTER_QUEUE``, and putting it back.

Listing takes them with ``basic.get`` on a channel of its own, acknowledging none: closing it
requeues each in its old place (the worker's dead-letter queue is a classic queue). ``--replay``
publishes a copy of each selected one to ``INPUT_QUEUE`` (body and properties kept, attempt and
reason headers dropped, its attempt count in Redis deleted) and acknowledges the dead letter once
the broker confirmed the copy. A crash in between leaves both;
the next replay's second copy is a duplicate to the worker's claims (docs/reliability.md,
"Replaying dead letters").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import sys
from argparse import Namespace
from collections import Counter
from collections.abc import AsyncGenerator
from dataclasses import asdict, dataclass
from typing import Any

import aio_pika
import aiormq
import orjson
from aio_pika.abc import AbstractConnection, AbstractExchange
from aio_pika.abc import AbstractIncomingMessage as Incoming

from worker.amqp.connection import CONNECTION_NAME, connect_once
from worker.cli.letters import Letter, letter_of, time_of
from worker.core.errors import ConfigError
from worker.core.redaction import redact_url, scrub
from worker.core.settings import Settings
from worker.redisio.clients import RedisClient, client_for
from worker.redisio.keys import RedisKeys
from worker.redisio.link import REDIS_ERRORS

REPLAY_HEADER = "x-neiromatrius-replay"
CONNECT_TIMEOUT_S = 10.0
# Headers the copy does not take over: x-death-reason/-detail and x-neiromatrius-attempt (the
# worker's marks), RabbitMQ's x-death, x-first-death-* and x-last-death-*.
DROPPED_HEADER_PREFIXES = (
    "x-death",
    "x-first-death",
    "x-last-death",
    "x-neiromatrius-",
    "x-delivery-count",
)
# Not user_id (the broker checks it against the login), nor expiration.
KEPT_PROPERTIES = ("content_type", "content_encoding", "correlation_id", "reply_to", "timestamp")
UNREACHABLE_ERRORS = (OSError, asyncio.TimeoutError, aiormq.exceptions.AMQPError)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    dl = sub.add_parser(
        "dead-letters",
        help="count DEAD_LETTER_QUEUE by reason (taking nothing off it), or replay it",
    )
    dl.add_argument("--show", type=int, default=0, metavar="N", help="list the first N messages")
    dl.add_argument("--text", action="store_true", help="with --show: include the message text")
    dl.add_argument("--json", action="store_true", help="machine-readable JSON")
    dl.add_argument("--replay", action="store_true", help="move them back to the input queue")
    dl.add_argument("--reason", default=None, help="with --replay: only those with this reason")
    dl.add_argument("--limit", type=int, default=0, metavar="N", help="with --replay: at most N")
    dl.add_argument("--pace-s", type=float, default=0.0, help=argparse.SUPPRESS)  # tests: slow


async def run(settings: Settings, args: Namespace) -> int:
    """The command; one line on stderr and exit 2 (configuration) or 1 (unreachable) on error."""
    if args.show < 0 or args.limit < 0 or args.pace_s < 0:
        return _fail("--show, --limit and --pace-s must be >= 0", 2)
    try:
        summary = await _command(settings, args)
    except ConfigError as exc:
        return _fail(str(exc), 2)
    except UNREACHABLE_ERRORS + REDIS_ERRORS as exc:
        return _fail((scrub(str(exc), settings.secrets) or type(exc).__name__).splitlines()[0], 1)
    as_json = orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode()
    print(as_json if args.json else render(summary))
    return 0


async def _command(settings: Settings, args: Namespace) -> dict[str, Any]:
    connection = await _connect(settings)
    try:
        if args.replay:
            return await _replay(connection, settings, args)
        return await _list(connection, settings, args)
    finally:
        with contextlib.suppress(*UNREACHABLE_ERRORS):  # gone: the broker requeues the unacked
            await connection.close()


def _fail(line: str, code: int) -> int:
    print(f"neiromatrius-worker dead-letters: {line}", file=sys.stderr)
    return code


async def _connect(settings: Settings) -> AbstractConnection:
    """A plain (not robust) connection: a replay must stop, not resume on a new one."""
    where, name = redact_url(settings.rabbitmq_url), f"{CONNECTION_NAME} dead-letters"
    try:
        return await connect_once(settings.rabbitmq_url, name=name, timeout_s=CONNECT_TIMEOUT_S)
    except aiormq.exceptions.ProbableAuthenticationError:
        raise ConfigError(f"RabbitMQ at {where} refused the login: check RABBITMQ_URL") from None
    except UNREACHABLE_ERRORS as exc:
        raise ConnectionError(f"RabbitMQ at {where} is unreachable: {type(exc).__name__}") from None


async def _depth(connection: AbstractConnection, queue: str, setting: str) -> int:
    """How many messages ``queue`` holds; ``ConfigError`` naming ``setting`` if it does not exist."""
    channel = await connection.channel()
    try:
        declared = await channel.declare_queue(queue, passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        raise ConfigError(f"{setting} names a queue that does not exist: {queue!r}") from None
    count = declared.declaration_result.message_count or 0
    await channel.close()
    return count


async def _fetch(connection: AbstractConnection, queue: str) -> AsyncGenerator[Incoming, None]:
    """The messages ``queue`` held when asked, unacknowledged, on a channel of its own; closing
    it at the end puts every one not acknowledged back where it was."""
    count = await _depth(connection, queue, "DEAD_LETTER_QUEUE")
    channel = await connection.channel()
    try:
        source = await channel.get_queue(queue, ensure=False)
        for _ in range(count):  # not beyond: letters dead-lettered again meanwhile come after
            message = await source.get(no_ack=False, fail=False)
            if message is None:
                break
            yield message
    finally:
        await channel.close()


async def _list(conn: AbstractConnection, settings: Settings, args: Namespace) -> dict[str, Any]:
    queue = settings.dead_letter_queue
    letters = [letter_of(m, with_text=args.text) async for m in _fetch(conn, queue)]
    return summarise(queue, letters, args.show)


def summarise(queue: str, letters: list[Letter], show: int) -> dict[str, Any]:
    """Counts by reason, the oldest and newest time ("unknown" without any), the first ``show``."""
    times = sorted(letter.time for letter in letters if letter.time)
    shown = [{k: v for k, v in asdict(x).items() if k != "text" or v} for x in letters[:show]]
    by_reason = dict(Counter(letter.reason for letter in letters).most_common())
    summary = {"queue": queue, "count": len(letters), "by_reason": by_reason}
    oldest, newest = (times[0], times[-1]) if times else ("unknown", "unknown")
    return {**summary, "oldest": oldest, "newest": newest, "messages": shown}


def render(summary: dict[str, Any]) -> str:
    """The summary for a terminal: a line per reason, then one per message shown."""
    if "replayed" in summary:
        line = "replayed {replayed} to {to}; {left} left in {queue} ({skipped_no_id} without an ID)"
        return line.format(**summary)
    lines = ["{queue}: {count} dead letters, oldest {oldest}, newest {newest}".format(**summary)]
    lines += [f"  {count:>8}  {reason}" for reason, count in summary["by_reason"].items()]
    row = "{message_id}  {reason}  attempts={attempts}  {time}  {detail}"
    for shown in summary["messages"]:
        lines.append(row.format(**{**shown, "time": shown["time"] or "unknown"}))
        lines += [f"    text: {shown['text']}"] if "text" in shown else []
    return "\n".join(lines)


def replay_copy(message: Incoming, message_id: str) -> aio_pika.Message:
    """The copy that goes back: body and properties kept, a fresh attempt count, a replay mark
    (the same for every copy of this dead letter, so two copies show they are one replay)."""
    old = message.headers or {}
    headers = {k: v for k, v in old.items() if not k.startswith(DROPPED_HEADER_PREFIXES)}
    mark = hashlib.sha256(orjson.dumps([message_id, time_of(message)]) + message.body)
    headers[REPLAY_HEADER] = mark.hexdigest()[:32]
    kept = {name: getattr(message, name) for name in KEPT_PROPERTIES}
    return aio_pika.Message(
        message.body,
        headers=headers,
        message_id=message.message_id or message_id,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        priority=message.priority,
        type=message.type,
        app_id=message.app_id,
        **kept,
    )


@dataclass(frozen=True, slots=True)
class _Target:
    """Where replayed copies go, and the Redis holding the attempt counts (None: memory mode)."""

    exchange: AbstractExchange
    queue: str
    redis: RedisClient | None
    keys: RedisKeys

    async def send(self, message: Incoming, message_id: str) -> None:
        """Resets the attempt count, then publishes the copy and waits for the broker's confirm."""
        if self.redis is not None:
            await self.redis.delete(self.keys.attempts(message_id))
        await self.exchange.publish(replay_copy(message, message_id), self.queue, mandatory=True)


async def _replay(conn: AbstractConnection, settings: Settings, args: Namespace) -> dict[str, Any]:
    queue = settings.dead_letter_queue
    await _depth(conn, settings.input_queue, "INPUT_QUEUE")
    out = await conn.channel(publisher_confirms=True)
    redis = await client_for(settings) if settings.redis_enabled else None
    if redis is None:
        print(
            "no REDIS_URL: replicas keep their own attempt counts until restarted", file=sys.stderr
        )
    keys = RedisKeys(settings.redis_key_prefix)
    target = _Target(out.default_exchange, settings.input_queue, redis, keys)
    try:
        replayed, skipped = await _replay_selected(conn, target, queue, args)
    finally:
        if redis is not None:
            await redis.aclose()
    left = await _depth(conn, queue, "DEAD_LETTER_QUEUE")
    summary = {"queue": queue, "to": target.queue, "reason": args.reason, "left": left}
    return {**summary, "replayed": replayed, "skipped_no_id": skipped}


async def _replay_selected(
    connection: AbstractConnection, target: _Target, queue: str, args: Namespace
) -> tuple[int, int]:
    """Replays the selected dead letters one at a time: how many, and how many had no ID."""
    replayed = skipped_no_id = 0
    async with contextlib.aclosing(_fetch(connection, queue)) as letters:
        async for message in letters:
            letter = letter_of(message)
            if args.reason is not None and letter.reason != args.reason:
                continue  # left unacknowledged: back in its place when the channel closes
            if letter.message_id is None:
                skipped_no_id += 1  # without an ID no claim could tell two copies apart
                continue
            await target.send(message, letter.message_id)
            replayed += 1
            if args.pace_s:  # tests only: a pause after the confirm, to be killed in before the ack
                print(f"published {replayed} {letter.message_id}", file=sys.stderr, flush=True)
                await asyncio.sleep(args.pace_s)
            await message.ack()  # only now: a crash before leaves the letter for the next run
            if replayed == args.limit:
                break
    return replayed, skipped_no_id
