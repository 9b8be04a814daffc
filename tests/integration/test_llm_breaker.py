"""The LLM circuit breaker on three real replicas: an outage or a refused key pauses cache misses
for the whole cluster (few requests, readiness 503, nothing dead-lettered, no attempt spent) while
cache hits flow, and everything is classified once the provider answers again; a message's own
failure still dead-letters and never opens the breaker.

The figures these tests print (run with ``-s``) are the ones docs/llm.md quotes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from tests.conftest import Names
from tests.integration.llm_server import FakeLLM, Reply, replica_env
from tests.integration.support import (
    Replicas,
    ResultSink,
    body,
    cluster_counters,
    drain_queue,
    publish_bodies,
    run_cli,
)
from worker.observability.metrics import CounterName

pytestmark = pytest.mark.integration

OUTAGE_S = 30.0
# The scenario: the worker's own defaults for attempts and retry delays.
DEFAULTS = {"MAX_ATTEMPTS": "5", "RETRY_BASE_DELAY_S": "1.0"}


@pytest.fixture
async def llm() -> AsyncIterator[FakeLLM]:
    async with FakeLLM(latency_s=0.02) as server:
        yield server


async def readiness(http: aiohttp.ClientSession, port: int) -> tuple[int, str]:
    async with http.get(f"http://127.0.0.1:{port}/health/ready") as response:
        return response.status, str((await response.json())["reason"])


async def wait_not_ready(
    replicas: Replicas, timeout_s: float, needle: str = ""
) -> dict[str, tuple[float, str]]:
    """Poll every replica's readiness until each answered 503 (with ``needle`` in its reason):
    when (epoch s) and why, per replica."""
    seen: dict[str, tuple[float, str]] = {}
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as http:
        while len(seen) < len(replicas) and time.monotonic() < deadline:
            for replica in replicas:
                if replica.name in seen:
                    continue
                status, reason = await readiness(http, replica.stats_port)
                if status == 503 and needle in reason:
                    seen[replica.name] = (time.time(), reason)
            await asyncio.sleep(0.1)
    assert len(seen) == len(replicas), f"not every replica went unready: {seen}"
    return seen


async def breaker_fields(client: aioredis.Redis, names: Names) -> dict[str, str]:
    """The one breaker hash of the test's deployment (empty before any failure)."""
    keys = [k async for k in client.scan_iter(match=names.keys.breaker_pattern, count=100)]
    assert len(keys) <= 1
    if not keys:
        return {}
    raw: dict[Any, Any] = await client.hgetall(keys[0])  # type: ignore[misc]
    return {k.decode(): v.decode() for k, v in raw.items()}


async def wait_open(client: aioredis.Redis, names: Names, timeout_s: float) -> dict[str, str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        fields = await breaker_fields(client, names)
        if fields.get("open") == "1":
            return fields
        await asyncio.sleep(0.05)
    raise AssertionError("the breaker did not open")


async def start_replicas(replicas: Replicas, env: dict[str, str], count: int = 3) -> None:
    for _ in range(count):
        replicas.start(env)
    await replicas.started()


async def test_an_outage_of_30_s_costs_few_requests_and_no_message(
    names: Names, redis_client: aioredis.Redis, amqp: object, tmp_path: Path, llm: FakeLLM
) -> None:
    """503 for 30 s while 300 messages wait: at most 90 requests reach the provider, every
    replica's readiness is 503 within 5 s of the breaker opening, texts cached before are still
    answered during the outage, and all 300 are classified within 10 s after it, none
    dead-lettered and no attempt spent."""
    cached_texts = [f"Где мой заказ номер {i}?" for i in range(20)]
    waiting = [body(f"wait-{i}", f"Посылка {i} не пришла, что делать?") for i in range(300)]
    replicas = Replicas(tmp_path)
    try:
        async with ResultSink(names) as sink:
            await start_replicas(replicas, replica_env(llm, names.env(), **DEFAULTS))
            await publish_bodies(names, [body(f"warm-{i}", t) for i, t in enumerate(cached_texts)])
            await sink.wait_for_ids({f"warm-{i}" for i in range(20)}, timeout_s=20)

            llm.down_with = 503
            outage_started = time.monotonic()
            await publish_bodies(names, waiting)
            opened = await wait_open(redis_client, names, timeout_s=5)
            unready = await wait_not_ready(replicas, timeout_s=6)
            opened_at = int(opened["opened"]) / 1000
            lag_s = {name: round(at - opened_at, 2) for name, (at, _) in unready.items()}

            hits = [body(f"hit-{i}", t) for i, t in enumerate(cached_texts)]
            hits_sent = time.monotonic()
            await publish_bodies(names, hits)
            await sink.wait_for_ids({h["message_id"] for h in hits}, timeout_s=10)
            hits_s = time.monotonic() - hits_sent
            assert time.monotonic() - outage_started < OUTAGE_S  # answered during the outage

            await asyncio.sleep(OUTAGE_S - (time.monotonic() - outage_started))
            llm.down_with = None
            recovered = time.monotonic()
            during = llm.requests_between(outage_started, recovered)
            await sink.wait_for_ids({m["message_id"] for m in waiting}, timeout_s=10)
            catch_up_s = time.monotonic() - recovered
            probe_s = min(r.received_at for r in llm.requests if r.received_at >= recovered)
            dead = await drain_queue(names, names.dead_letter_queue, timeout_s=1)
            counters = await cluster_counters(redis_client, names)
            print(
                f"\noutage 503 {OUTAGE_S:g} s, 300 waiting: {len(during)} requests during it "
                f"({sum(r.status == 503 for r in during)} answered 503), readiness 503 after "
                f"{lag_s} s, 20 cache hits answered in {hits_s:.2f} s during it, first probe "
                f"{probe_s - recovered:.2f} s after it, all 300 classified {catch_up_s:.2f} s "
                f"after it; opens {counters['breaker_opens']}, "
                f"probes {counters['breaker_probes']}, held {counters['breaker_held']}"
            )

            assert len(during) <= 90
            assert all(0 <= lag <= 5 for lag in lag_s.values())
            assert all(r[1].startswith("LLM circuit breaker open") for r in unready.values())
            assert all(sink.by_id[h["message_id"]][0]["classification"]["cached"] for h in hits)
            assert catch_up_s <= 10
            assert dead == []
            assert counters[CounterName.RETRIED] == 0  # nothing went round the retry queues
            assert counters[CounterName.FAILED] == 0
            assert counters[CounterName.BREAKER_HELD] > 0
            for message in waiting:
                result = sink.by_id[str(message["message_id"])][0]["classification"]
                assert result["label"] == llm.label_for(str(message["text"]))
    finally:
        replicas.close()


async def test_a_refused_key_pauses_the_cluster_and_resumes_without_a_restart(
    names: Names, redis_client: aioredis.Redis, amqp: object, tmp_path: Path, llm: FakeLLM
) -> None:
    """401 for 30 s with 200 messages: none dead-lettered, all classified once the key is
    accepted again, one error line per replica naming LLM_API_KEY, readiness 503 with that reason
    and ``check`` saying it in one line. (Configuration probes every 5 s instead of the default
    30 s, to keep the test short.)"""
    messages = [body(f"key-{i}", f"Хочу вернуть товар {i}") for i in range(200)]
    env = replica_env(llm, names.env(), LLM_BREAKER_CONFIG_PROBE_S="5", **DEFAULTS)
    replicas = Replicas(tmp_path)
    try:
        async with ResultSink(names) as sink:
            await start_replicas(replicas, env)
            llm.down_with = 401
            refused_from = time.monotonic()
            await publish_bodies(names, messages)
            unready = await wait_not_ready(replicas, timeout_s=6, needle="LLM_API_KEY")
            code, lines = await asyncio.to_thread(run_cli, env, "check")
            await asyncio.sleep(OUTAGE_S - (time.monotonic() - refused_from))
            llm.down_with = None
            accepted = time.monotonic()
            during = llm.requests_between(refused_from, accepted)
            await sink.wait_for_ids({m["message_id"] for m in messages}, timeout_s=20)
            resumed_s = time.monotonic() - accepted
            dead = await drain_queue(names, names.dead_letter_queue, timeout_s=1)
            counters = await cluster_counters(redis_client, names)
            print(
                f"\nkey refused (401) {OUTAGE_S:g} s, 200 waiting: {len(during)} requests during "
                f"it, all classified {resumed_s:.2f} s after the key was accepted again"
            )

            assert dead == []
            assert counters[CounterName.RETRIED] == 0
            for replica in replicas:
                errors = [
                    e
                    for e in replica.events()
                    if e.get("event") == "llm_breaker_open" and e.get("level") == "error"
                ]
                assert len(errors) == 1, replica.log_tail()
                assert "LLM_API_KEY" in errors[0]["reason"]
            assert all("LLM_API_KEY" in reason for _, reason in unready.values())
            breaker_lines = [line for line in lines if "llm breaker" in line]
            assert code == 1
            assert len(breaker_lines) == 1
            assert "check LLM_API_KEY" in breaker_lines[0]
            assert breaker_lines[0].startswith("FAIL")
    finally:
        replicas.close()


async def test_an_outage_longer_than_the_whole_retry_schedule_dead_letters_nothing(
    names: Names, redis_client: aioredis.Redis, amqp: object, tmp_path: Path, llm: FakeLLM
) -> None:
    """With MAX_ATTEMPTS=3, RETRY_BASE_DELAY_S=0.2 and LLM_MAX_RETRIES=1 the whole retry schedule
    is about 2 s; an outage of 12 s dead-letters nothing, and everything is classified after."""
    messages = [body(f"long-{i}", f"Не работает приложение, версия {i}") for i in range(100)]
    env = replica_env(
        llm, names.env(), MAX_ATTEMPTS="3", RETRY_BASE_DELAY_S="0.2", LLM_MAX_RETRIES="1"
    )
    replicas = Replicas(tmp_path)
    try:
        async with ResultSink(names) as sink:
            await start_replicas(replicas, env, count=2)
            llm.down_with = 503
            await publish_bodies(names, messages)
            await wait_open(redis_client, names, timeout_s=5)
            await asyncio.sleep(12)
            llm.down_with = None
            await sink.wait_for_ids({m["message_id"] for m in messages}, timeout_s=15)
            dead = await drain_queue(names, names.dead_letter_queue, timeout_s=1)
            assert dead == []
            assert (await cluster_counters(redis_client, names))[CounterName.RETRIED] == 0
    finally:
        replicas.close()


async def test_a_validation_failure_dead_letters_and_never_opens_the_breaker(
    names: Names, redis_client: aioredis.Redis, amqp: object, tmp_path: Path, llm: FakeLLM
) -> None:
    """A label outside LLM_LABELS, every time: retried, dead-lettered after MAX_ATTEMPTS, and
    the breaker (a threshold of 2 here) never opens, while other texts are classified."""
    hopeless = "Какая погода будет завтра?"
    llm.script(hopeless, *(Reply.unknown_label() for _ in range(20)))
    env = replica_env(
        llm, names.env(), MAX_ATTEMPTS="3", LLM_MAX_RETRIES="1", LLM_BREAKER_FAILURES="2"
    )
    others = [body(f"fine-{i}", f"Спасибо за заказ {i}") for i in range(10)]
    replicas = Replicas(tmp_path)
    try:
        async with ResultSink(names) as sink:
            await start_replicas(replicas, env, count=1)
            await publish_bodies(names, [body("hopeless", hopeless), *others])
            dead = await drain_queue(names, names.dead_letter_queue, timeout_s=20, expected=1)
            await sink.wait_for_ids({m["message_id"] for m in others}, timeout_s=10)

            assert [m.message_id for m in dead] == ["hopeless"]
            assert dead[0].headers["x-death-reason"] == "retries_exhausted"
            assert dead[0].headers["x-neiromatrius-attempt"] == 3
            assert len(llm.requests_for(hopeless)) == 6  # 3 attempts of 2 calls
            fields = await breaker_fields(redis_client, names)
            assert fields.get("open", "0") == "0"
            assert fields.get("opens", "0") == "0"
            assert '"event":"llm_breaker_open"' not in replicas.all[0].log_text()
    finally:
        replicas.close()
