"""An LLM that rate-limits, fails or answers nonsense: every message is still classified (or
dead-lettered with its reason), Retry-After is respected, and no bad answer is ever cached."""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
import redis.asyncio as aioredis

from tests.conftest import Names
from tests.integration.llm_server import FakeLLM, Reply, replica_env
from tests.integration.support import Replicas, ResultSink, body, drain_queue, publish_bodies

pytestmark = pytest.mark.integration

RETRY_AFTER_S = 1.0


@pytest.fixture
async def llm() -> AsyncIterator[FakeLLM]:
    async with FakeLLM(latency_s=0.02) as server:
        yield server


async def test_429_and_500_for_a_while_every_message_is_classified(
    names: Names, redis_client: aioredis.Redis, amqp: object, tmp_path: Path, llm: FakeLLM
) -> None:
    """For 1 s the server answers 429 (Retry-After: 1), then 500 for 0.8 s: all messages of three
    replicas are still classified, and no text is asked again before its Retry-After has passed."""
    started: list[float] = []

    def outage(text: str, seen: int) -> Reply | None:
        now = time.monotonic()
        if not started:
            started.append(now)
        if now - started[0] < 1.0:
            return Reply.rate_limited(RETRY_AFTER_S)
        if now - started[0] < 1.8:
            return Reply.server_error(500)
        return None

    llm.policy = outage
    texts = [f"Сломался товар номер {i}, верните деньги" for i in range(30)]
    messages = [body(f"m-{i}-{c}", texts[i]) for i in range(30) for c in range(2)]
    replicas = Replicas(tmp_path)
    try:
        async with ResultSink(names) as sink:
            for _ in range(3):
                replicas.start(replica_env(llm, names.env(), LLM_MAX_RETRIES="3"))
            for replica in replicas.all:
                await replica.started()
            await publish_bodies(names, messages)
            await sink.wait_for_ids({m["message_id"] for m in messages}, timeout_s=40)

            statuses = [r.status for r in llm.requests]
            assert statuses.count(429) >= 3
            assert statuses.count(500) >= 3
            for message in messages:
                result = sink.by_id[str(message["message_id"])][0]
                assert result["classification"]["label"] == llm.label_for(str(message["text"]))
            for text in texts:
                asked = llm.requests_for(text)
                assert asked[-1].status == 200
                for earlier, later in itertools.pairwise(asked):
                    if earlier.status == 429:
                        assert later.received_at - earlier.answered_at >= RETRY_AFTER_S
            log = "".join(replica.log_text() for replica in replicas.all)
            assert '"event":"llm_call_failed"' in log
    finally:
        replicas.close()


async def test_invalid_answers_are_retried_and_never_cached(
    names: Names, redis_client: aioredis.Redis, amqp: object, tmp_path: Path, llm: FakeLLM
) -> None:
    """Not-JSON and unknown-label answers send the message through the worker's retries; only the
    valid answer is cached, and a text that never gets one is dead-lettered with nothing cached."""
    fixed, hopeless = "Хочу заказать пиццу", "Какая погода завтра?"
    llm.script(fixed, Reply.not_json(), Reply.unknown_label(), Reply.ok("order", 0.8))
    llm.script(hopeless, *(Reply.unknown_label() for _ in range(10)))
    replicas = Replicas(tmp_path)
    try:
        async with ResultSink(names) as sink:
            replica = replicas.start(
                replica_env(llm, names.env(), LLM_MAX_RETRIES="0", MAX_ATTEMPTS="3")
            )
            await replica.started()
            await publish_bodies(names, [body("fixed", fixed), body("hopeless", hopeless)])
            await sink.wait_for_ids({"fixed"}, timeout_s=20)
            dead = await drain_queue(names, names.dead_letter_queue, timeout_s=20, expected=1)

            assert sink.by_id["fixed"][0]["classification"] == {
                "label": "order",
                "confidence": 0.8,
                "classifier": "llm",
                "cached": False,
            }
            assert [r.status for r in llm.requests_for(fixed)] == [200, 200, 200]
            assert len(llm.requests_for(hopeless)) == 3
            assert [m.message_id for m in dead] == ["hopeless"]
            assert dead[0].headers["x-death-reason"] == "retries_exhausted"
            cached = [
                orjson.loads(await redis_client.get(key))
                async for key in redis_client.scan_iter(match=names.keys.cache_pattern, count=1000)
            ]
            assert [entry["label"] for entry in cached] == ["order"]
            assert "hopeless" not in sink.by_id
    finally:
        replicas.close()
