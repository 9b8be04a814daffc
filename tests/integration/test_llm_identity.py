"""The cache key covers the LLM model: another model never gets an answer cached for the first."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests.conftest import Names
from tests.integration.llm_server import FakeLLM, replica_env
from tests.integration.support import Replicas, ResultSink, body, publish_bodies

pytestmark = pytest.mark.integration


@pytest.fixture
async def llm() -> AsyncIterator[FakeLLM]:
    async with FakeLLM() as server:
        yield server


async def test_changing_llm_model_makes_cached_texts_miss(
    names: Names, redis_client: aioredis.Redis, amqp: object, tmp_path: Path, llm: FakeLLM
) -> None:
    """A text cached under model A misses after a restart with model B (the server is asked, with
    model B); back on model A it is a hit again, served from Redis without asking the server."""
    text = "Здравствуйте! Сколько стоит доставка в Казань?"
    replicas = Replicas(tmp_path)
    try:
        async with ResultSink(names) as sink:
            for model, message_id in (("model-a", "a-1"), ("model-b", "b-1"), ("model-a", "a-2")):
                replica = replicas.start(replica_env(llm, names.env(), LLM_MODEL=model))
                await replica.started()
                await publish_bodies(names, [body(message_id, text)])
                await sink.wait_for_ids({message_id}, timeout_s=20)
                replica.signal(signal.SIGTERM)
                assert await replica.wait_exit() == 0

            assert [r.model for r in llm.requests] == ["model-a", "model-b"]
            cached = {
                m: sink.by_id[m][0]["classification"]["cached"] for m in ("a-1", "b-1", "a-2")
            }
            assert cached == {"a-1": False, "b-1": False, "a-2": True}
            entries = [
                key async for key in redis_client.scan_iter(names.keys.cache_pattern, count=1000)
            ]
            assert len(entries) == 2  # one per model, side by side
    finally:
        replicas.close()
