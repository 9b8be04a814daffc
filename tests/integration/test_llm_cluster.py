"""Three replicas classifying through a (local) LLM: each distinct text costs one call for the
cluster, and a text already classified is answered faster by at least the model's latency."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pytest

from tests.conftest import RABBITMQ_URL, Names
from tests.integration.llm_server import FakeLLM, replica_env
from tests.integration.support import Replicas, ResultSink, bind_results, body, publish_bodies

pytestmark = pytest.mark.integration

LATENCY_S = 0.4


class Timed:
    """Publishes one message at a time on an open channel and times it until its result arrives."""

    def __init__(self, names: Names) -> None:
        self._names = names
        self._arrivals: dict[str, asyncio.Future[dict[str, Any]]] = {}

    async def open(self) -> None:
        self._connection = await aio_pika.connect_robust(RABBITMQ_URL)
        await bind_results(self._connection, self._names, self._on_result)
        self._publisher = await self._connection.channel(publisher_confirms=False)

    async def _on_result(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        result = orjson.loads(message.body)
        waiting = self._arrivals.get(result["message_id"])
        if waiting is not None and not waiting.done():
            waiting.set_result(result)

    async def roundtrip(self, message_id: str, text: str) -> tuple[float, dict[str, Any]]:
        """Seconds from publishing ``text`` to receiving its result, and the result."""
        arrived = asyncio.get_running_loop().create_future()
        self._arrivals[message_id] = arrived
        payload = aio_pika.Message(orjson.dumps(body(message_id, text)), message_id=message_id)
        started = time.perf_counter()
        await self._publisher.default_exchange.publish(payload, routing_key=self._names.input_queue)
        result = await asyncio.wait_for(arrived, timeout=20)
        return time.perf_counter() - started, result

    async def close(self) -> None:
        await self._connection.close()


@pytest.fixture
async def llm() -> AsyncIterator[FakeLLM]:
    async with FakeLLM(latency_s=LATENCY_S) as server:
        yield server


async def test_600_messages_with_60_texts_make_exactly_60_llm_calls(
    names: Names, redis_client: object, amqp: object, tmp_path: Path, llm: FakeLLM
) -> None:
    """Copies of each of 60 texts reach three replicas at the same moment: the LLM server receives
    exactly 60 requests (one per text) and all 600 messages get a result with the server's label."""
    texts = [f"Message number {i}: где мой заказ и когда доставка?" for i in range(60)]
    messages = [body(f"m-{t}-{c}", texts[t]) for t in range(60) for c in range(10)]
    replicas = Replicas(tmp_path)
    try:
        async with ResultSink(names) as sink:
            for _ in range(3):
                replicas.start(replica_env(llm, names.env(), PREFETCH="64"))
            await asyncio.gather(*(replica.started() for replica in replicas.all))
            started = time.perf_counter()
            await publish_bodies(names, messages)
            await sink.wait_for_ids({m["message_id"] for m in messages}, timeout_s=40)
            took_s = time.perf_counter() - started
            await sink.settle(quiet_s=0.5)
            print(f"\n600 messages, 60 texts: {len(llm.requests)} LLM requests, {took_s:.2f} s")

            assert len(llm.requests) == 60
            assert sorted(r.text for r in llm.requests) == sorted(texts)
            assert sink.total == 600
            for message in messages:
                (result,) = sink.by_id[str(message["message_id"])]
                assert result["classification"]["label"] == llm.label_for(str(message["text"]))
                assert result["classification"]["classifier"] == "llm"
            computed = [
                r[0]["message_id"]
                for r in sink.by_id.values()
                if not r[0]["classification"]["cached"]
            ]
            assert len(computed) == 60  # one computation per text in the whole cluster
    finally:
        replicas.close()


async def test_second_message_with_a_classified_text_is_faster_by_the_llm_latency(
    names: Names, redis_client: object, amqp: object, tmp_path: Path, llm: FakeLLM
) -> None:
    """The source document's check, "send the same message twice, the second is faster": over five
    texts, the second message completes faster than the first by at least the server's latency."""
    replicas = Replicas(tmp_path)
    timed = Timed(names)
    try:
        for _ in range(3):
            replicas.start(replica_env(llm, names.env(), PREFETCH="16"))
        await asyncio.gather(*(replica.started() for replica in replicas.all))
        await timed.open()
        for i in range(3):  # warm every path (connections, scripts) before measuring
            await timed.roundtrip(f"warm-{i}", f"warm-up text {i}")
        firsts, seconds = [], []
        for i in range(5):
            text = f"Здравствуйте, у меня вопрос про возврат номер {i}"
            first_s, first = await timed.roundtrip(f"first-{i}", text)
            second_s, second = await timed.roundtrip(f"second-{i}", text)
            assert first["classification"] == {**second["classification"], "cached": False}
            assert second["classification"]["cached"] is True
            firsts.append(first_s)
            seconds.append(second_s)
        first_ms = statistics.median(firsts) * 1000
        second_ms = statistics.median(seconds) * 1000
        print(
            f"\nLLM latency {LATENCY_S * 1000:.0f} ms: first message median {first_ms:.1f} ms "
            f"(all {[round(s * 1000, 1) for s in firsts]}), second median {second_ms:.1f} ms "
            f"(all {[round(s * 1000, 1) for s in seconds]})"
        )
        assert len(llm.requests) == 3 + 5
        assert first_ms - second_ms >= LATENCY_S * 1000
        assert max(seconds) < LATENCY_S < min(firsts)
    finally:
        await timed.close()
        replicas.close()
