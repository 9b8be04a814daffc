"""Fixtures shared by every test: where the real Redis and RabbitMQ are, and unique names per test.

Integration tests find the services through the same variables as production (``REDIS_URL``,
``RABBITMQ_URL``), defaulting to the local ones on 127.0.0.1. Every test gets its own queue,
exchange and key-prefix names, and everything it created is removed afterwards.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import aio_pika
import pytest
import redis.asyncio as aioredis

REDIS_URL = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
RABBITMQ_URL = os.environ.get("RABBITMQ_URL") or "amqp://guest:guest@127.0.0.1:5672/"


@dataclass(frozen=True)
class Names:
    """The broker and Redis names one test uses."""

    tag: str

    @property
    def input_queue(self) -> str:
        return f"test.{self.tag}.in"

    @property
    def results_exchange(self) -> str:
        return f"test.{self.tag}.out"

    @property
    def dead_letter_queue(self) -> str:
        return f"test.{self.tag}.dead"

    @property
    def key_prefix(self) -> str:
        return f"test:{self.tag}:"

    def env(self, *, redis: bool = True, **extra: str) -> dict[str, str]:
        """Environment for a replica or CLI process of this test."""
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in {"REDIS_URL", "RABBITMQ_URL", "FAULT_INJECTION", "PYTEST_CURRENT_TEST"}
        }
        env.update(
            RABBITMQ_URL=RABBITMQ_URL,
            INPUT_QUEUE=self.input_queue,
            RESULTS_EXCHANGE=self.results_exchange,
            DEAD_LETTER_QUEUE=self.dead_letter_queue,
            REDIS_KEY_PREFIX=self.key_prefix,
            STATS_PORT="0",
            STATS_HOST="127.0.0.1",
            LOG_FORMAT="json",
            LOG_LEVEL="info",
            RETRY_BASE_DELAY_S="0.2",
            HEARTBEAT_INTERVAL_S="0.5",
            DRAIN_TIMEOUT_S="10",
        )
        if redis:
            env["REDIS_URL"] = REDIS_URL
        env.update(extra)
        return env


@pytest.fixture
def names() -> Iterator[Names]:
    tag = uuid.uuid4().hex[:10]
    return Names(tag)


@pytest.fixture
async def redis_client(names: Names) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        yield client
    finally:
        keys = [k async for k in client.scan_iter(match=f"{names.key_prefix}*", count=1000)]
        for start in range(0, len(keys), 500):
            await client.delete(*keys[start : start + 500])
        await client.aclose()


@pytest.fixture
async def amqp(names: Names) -> AsyncIterator[aio_pika.abc.AbstractRobustConnection]:
    connection = await aio_pika.connect_robust(RABBITMQ_URL)
    try:
        yield connection
    finally:
        channel = await connection.channel()
        for queue in (names.input_queue, names.dead_letter_queue):
            try:
                await channel.queue_delete(queue, if_unused=False, if_empty=False)
            except aio_pika.exceptions.AMQPError:
                channel = await connection.channel()
        for attempt_delay in (200, 400, 800, 1600, 3200, 6400, 12800):
            try:
                await channel.queue_delete(
                    f"{names.input_queue}.retry.{attempt_delay}ms", if_unused=False, if_empty=False
                )
            except aio_pika.exceptions.AMQPError:
                channel = await connection.channel()
        with contextlib.suppress(aio_pika.exceptions.AMQPError):
            await channel.exchange_delete(names.results_exchange)
        await connection.close()
