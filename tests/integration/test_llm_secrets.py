"""The LLM API key goes to the LLM server and nowhere else: not in logs, stats, metrics, results,
dead letters, command output or configuration errors."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests.conftest import Names
from tests.integration.llm_server import FakeLLM, Reply, replica_env
from tests.integration.support import (
    Replicas,
    ResultSink,
    body,
    drain_queue,
    publish_bodies,
    wait_counter,
)
from worker.observability.metrics import CounterName

pytestmark = pytest.mark.integration


def http_get(port: int, path: str) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return str(response.read().decode())
    except urllib.error.HTTPError as exc:  # /health/ready may answer 503: its body counts too
        return str(exc.read().decode())


def run_cli(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "worker", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done.stdout + done.stderr


@pytest.fixture
async def llm() -> AsyncIterator[FakeLLM]:
    async with FakeLLM() as server:
        yield server


async def test_the_api_key_never_leaves_the_authorization_header(
    names: Names, redis_client: aioredis.Redis, amqp: object, tmp_path: Path, llm: FakeLLM
) -> None:
    """With debug logging, 401s (each pauses the replica's classifier until a probe gets an
    answer), 500s and a 429 whose bodies quote the key, and a text whose answers fail validation,
    the key reaches the server in every request's Authorization header and appears in no log
    line, stats or metrics answer, result, dead letter, ``check``/``stats`` output or
    configuration error."""
    key = f"sk-secret-{uuid.uuid4().hex}"
    llm.script("rejected text", *(Reply.http_error(401) for _ in range(5)))
    llm.script("flaky text", Reply.server_error(500), Reply.server_error(502), Reply.ok("other"))
    llm.script("limited text", Reply.rate_limited(0.2), Reply.ok("question"))
    # Enough invalid answers for its attempts and for any breaker probe that sends this text.
    llm.script("hopeless text", *(Reply.unknown_label() for _ in range(60)))
    env = replica_env(
        llm,
        names.env(LOG_LEVEL="debug", MAX_ATTEMPTS="2"),
        LLM_API_KEY=key,
        LLM_MAX_RETRIES="2",
        LLM_BREAKER_CONFIG_PROBE_S="0.5",
    )
    replicas = Replicas(tmp_path)
    try:
        async with ResultSink(names) as sink:
            replica = replicas.start(env)
            await replica.started()
            texts = ["rejected text", "flaky text", "limited text", "fine text", "hopeless text"]
            await publish_bodies(names, [body(f"m-{i}", t) for i, t in enumerate(texts)])
            await sink.wait_for_ids({"m-0", "m-1", "m-2", "m-3"}, timeout_s=30)
            dead = await drain_queue(names, names.dead_letter_queue, timeout_s=20, expected=1)
            await wait_counter(redis_client, names, CounterName.DEAD_LETTERED, 1)

            assert llm.requests
            assert all(r.authorization == f"Bearer {key}" for r in llm.requests)
            assert [m.message_id for m in dead] == ["m-4"]
            seen = [
                replica.log_text(),
                *(
                    await asyncio.gather(
                        *(
                            asyncio.to_thread(http_get, replica.stats_port, path)
                            for path in (
                                "/api/monitoring/stats",
                                "/metrics",
                                "/health/live",
                                "/health/ready",
                            )
                        )
                    )
                ),
                repr(dict(sink.by_id)),
                repr([(m.headers, m.body) for m in dead]),
                await asyncio.to_thread(run_cli, env, "check"),
                await asyncio.to_thread(run_cli, env, "stats", "--json"),
                await asyncio.to_thread(run_cli, {**env, "LLM_TIMEOUT_S": "-1"}, "run"),
            ]
            assert "HTTP 401" in seen[0]  # the failures were logged, just not the key
            assert "check LLM_API_KEY" in seen[0]  # the breaker's error line
            for text in seen:
                assert key not in text
                assert key[10:] not in text  # not even a part of it
    finally:
        replicas.close()
