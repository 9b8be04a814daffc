"""Fixtures shared by every test: where the real Redis and RabbitMQ are, unique names per test, and
an environment of its own for every test.

Integration tests find the services through the same variables as production (``REDIS_URL``,
``RABBITMQ_URL``), read once from the outer environment when the tests are collected and
defaulting to the local ones on 127.0.0.1. Every test gets its own queue, exchange and key-prefix
names, and everything it created is removed afterwards.

Every test runs in a folder of its own, with none of the variables ``Settings`` reads, so neither
a ``.env`` in the checkout nor the developer's shell reaches its settings or its replicas: a test
sets what it needs. ``AMQP_FAST_PATH`` is the exception: CI runs the integration tests with the
fast path on and off by setting it outside.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import pytest
import redis.asyncio as aioredis

from worker.cli.replicas import ReplicaNames, replica_env
from worker.core.settings import UNROUTED_SUFFIX, Settings
from worker.redisio.keys import RedisKeys

REDIS_URL = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
RABBITMQ_URL = os.environ.get("RABBITMQ_URL") or "amqp://guest:guest@127.0.0.1:5672/"
KEPT_FROM_OUTSIDE = frozenset({"AMQP_FAST_PATH"})


def leaking_variables(environ: dict[str, str] | os._Environ[str]) -> list[str]:
    """The variables of ``environ`` a test must not see: every one ``Settings`` reads (in any
    case: it reads them case-insensitively) and the OpenTelemetry SDK's, but the kept ones."""
    read = {name.upper() for name in Settings.model_fields} - KEPT_FROM_OUTSIDE
    return [name for name in environ if name.upper() in read or name.upper().startswith("OTEL_")]


@pytest.fixture(autouse=True)
def isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Each test starts in its own folder, without the outer settings (see the module docstring)."""
    for name in leaking_variables(os.environ):
        monkeypatch.delenv(name)
    # Settings reads ``.env`` from the working directory, and so do the replicas a test starts.
    monkeypatch.chdir(tmp_path)


class Names(ReplicaNames):
    """The broker and Redis names one test uses."""

    __slots__ = ()

    @classmethod
    def create(cls, tag: str) -> Names:
        return cls(tag, f"test.{tag}.in", f"test.{tag}.out", f"test.{tag}.dead", f"test:{tag}:")

    @property
    def keys(self) -> RedisKeys:
        """The worker's key layout under this test's prefix (keys are spelled there only)."""
        return RedisKeys(self.key_prefix)

    def env(self, *, redis: bool = True, **extra: str) -> dict[str, str]:
        """Environment for a replica or CLI process of this test."""
        env = replica_env(
            os.environ,
            self,
            # Set here or left out: a test's replica sees only the services it is told about.
            drop={"REDIS_URL", "RABBITMQ_URL", "FAULT_INJECTION", "PYTEST_CURRENT_TEST"},
            RABBITMQ_URL=RABBITMQ_URL,
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
def names() -> Names:
    return Names.create(uuid.uuid4().hex[:10])


@pytest.fixture
async def redis_client(names: Names) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        yield client
    finally:
        keys = [k async for k in client.scan_iter(match=names.keys.everything, count=1000)]
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
        unrouted = names.results_exchange + UNROUTED_SUFFIX
        for queue in (names.input_queue, names.dead_letter_queue, unrouted):
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
        for exchange in (names.results_exchange, unrouted):
            with contextlib.suppress(aio_pika.exceptions.AMQPError):
                await channel.exchange_delete(exchange)
                continue
            channel = await connection.channel()
        await connection.close()
