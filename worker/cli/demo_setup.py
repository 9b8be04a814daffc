"""What the demo sets up and removes around a run: its names, the reachability check, and the
clean-up of its queues, exchange and Redis keys."""

from __future__ import annotations

import contextlib
import uuid
from dataclasses import dataclass
from typing import TextIO

import aio_pika

from worker.amqp.connection import CONNECTION_NAME, connect_once
from worker.cli.replicas import ReplicaNames
from worker.core.redaction import redact_url
from worker.core.settings import Settings
from worker.observability.stats import QUEUE_PROBE_ERRORS
from worker.redisio.clients import make_client
from worker.redisio.link import REDIS_ERRORS


class DemoFailed(Exception):
    """The demo could not run to the end; the message says why."""


@dataclass(frozen=True, slots=True)
class DemoOptions:
    replicas: int = 3
    messages: int = 2000
    duplicates: float = 0.2
    repeat_texts: float = 0.5
    rate_per_s: float = 0.0
    seed: int | None = None
    redis_url: str = ""
    no_redis: bool = False  # --no-redis: in-memory replicas asked for, whatever REDIS_URL says
    timeout_s: float = 120.0
    as_json: bool = False


def demo_names() -> ReplicaNames:
    """The broker and Redis names of one demo run, after a random run tag."""
    tag = uuid.uuid4().hex[:8]
    return ReplicaNames(
        tag=tag,
        input_queue=f"neiromatrius.demo.{tag}.messages",
        results_exchange=f"neiromatrius.demo.{tag}.classified",
        dead_letter_queue=f"neiromatrius.demo.{tag}.dead",
        key_prefix=f"neiromatrius:demo:{tag}:",
    )


async def preflight(settings: Settings, redis_url: str) -> aio_pika.abc.AbstractConnection:
    """Reach the broker (and Redis), so a wrong URL is one clear line, not a hang."""
    where = redact_url(settings.rabbitmq_url)
    try:
        connection = await connect_once(settings.rabbitmq_url, name=f"{CONNECTION_NAME} demo")
    except QUEUE_PROBE_ERRORS as exc:
        raise DemoFailed(
            f"cannot reach RabbitMQ at {where} ({type(exc).__name__}); start it or set RABBITMQ_URL"
        ) from None
    if redis_url:
        client = await make_client(redis_url, settings.redis_mode, settings.redis_timeout_s)
        try:
            await client.ping()  # type: ignore[misc]
        except REDIS_ERRORS as exc:
            await connection.close()
            raise DemoFailed(
                f"⚠️ Redis connection failed: {redact_url(redis_url)} "
                f"({type(exc).__name__}); start it, or run the demo without Redis (--no-redis)"
            ) from None
        finally:
            await client.aclose()
    return connection


async def remove_broker_objects(settings: Settings, names: ReplicaNames) -> None:
    """Delete the run's queues (retry queues included) and exchange, each step on its own."""
    # The retry queues are named after the input queue, as the replicas named them.
    topology = names.topology(settings)
    queues = [names.input_queue, names.dead_letter_queue, topology.unrouted]
    queues += [topology.retry_queue(a) for a in range(1, settings.max_attempts)]
    with contextlib.suppress(*QUEUE_PROBE_ERRORS):
        connection = await connect_once(settings.rabbitmq_url, name=f"{CONNECTION_NAME} demo")
        try:
            for queue in queues:
                with contextlib.suppress(*QUEUE_PROBE_ERRORS):
                    channel = await connection.channel()
                    await channel.queue_delete(queue)
                    await channel.close()
            with contextlib.suppress(*QUEUE_PROBE_ERRORS):
                channel = await connection.channel()
                await channel.exchange_delete(names.results_exchange)
                await channel.exchange_delete(topology.unrouted)
                await channel.close()
        finally:
            await connection.close()


async def remove_redis_keys(
    settings: Settings, redis_url: str, names: ReplicaNames, err: TextIO
) -> None:
    """Delete every key under the run's prefix (they expire anyway: best effort)."""
    client = await make_client(redis_url, settings.redis_mode, settings.redis_timeout_s)
    try:
        prefix = f"{names.key_prefix}*"
        keys = [k async for k in client.scan_iter(match=prefix, count=1000)]
        for start in range(0, len(keys), 500):
            await client.delete(*keys[start : start + 500])
    except REDIS_ERRORS:
        err.write("demo: could not remove the run's Redis keys (they expire)\n")
    finally:
        await client.aclose()
