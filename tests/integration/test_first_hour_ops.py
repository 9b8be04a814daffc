"""The first hour of an operator: logs that stay JSON through a broker restart, the Redis figures."""

from __future__ import annotations

import asyncio
import io
import re
import sys
import uuid
from pathlib import Path

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis

from tests.conftest import RABBITMQ_URL, Names
from tests.integration.llm_server import FakeLLM, replica_env
from tests.integration.proxy import CuttableProxy
from tests.integration.servers import free_port
from tests.integration.support import Replicas, ResultSink, body, publish_bodies, run_cli
from worker.cli.demo import DemoOptions, run_demo
from worker.core.settings import load_settings

pytestmark = pytest.mark.integration


def not_json(log_text: str) -> list[str]:
    """The lines of a log that are not one JSON object each."""
    bad = []
    for line in log_text.splitlines():
        try:
            parsed = orjson.loads(line)
        except orjson.JSONDecodeError:
            bad.append(line)
            continue
        if not isinstance(parsed, dict):
            bad.append(line)
    return bad


async def test_broker_restart_keeps_every_log_line_json(
    names: Names, amqp: object, tmp_path: Path
) -> None:
    """Under LOG_FORMAT=json, a broker connection cut and restored leaves every line of the
    replica's output a JSON object (the libraries' errors included), and the replica reconnects."""
    replicas = Replicas(tmp_path)
    upstream = RABBITMQ_URL.split("@")[-1].rstrip("/")
    host, _, port = upstream.partition(":")
    async with CuttableProxy(host, int(port or 5672)) as proxy, ResultSink(names) as sink:
        try:
            url = RABBITMQ_URL.replace(upstream, f"127.0.0.1:{proxy.port}")
            replica = replicas.start(names.env(redis=False, RABBITMQ_URL=url))
            await replica.started()
            await publish_bodies(names, [body("before-1", "Привет")])
            await sink.wait_for_ids({"before-1"}, timeout_s=20)
            logged_before = len(replica.log_text().splitlines())

            proxy.cut()
            # The libraries notice the loss and fail one reconnection attempt at least.
            await replica.wait_for_log("Reconnecting after", timeout_s=20)
            proxy.restore()

            await publish_bodies(names, [body("after-1", "Снова на связи")])
            await sink.wait_for_ids({"after-1"}, timeout_s=40)
        finally:
            await replica.stop(15)
            replicas.close()
    text = replica.log_text()
    assert len(text.splitlines()) > logged_before
    assert not_json(text) == [], "\n".join(not_json(text)[:20])
    library = [e for e in replica.events() if str(e.get("logger", "")).startswith("aio")]
    assert any("Reconnecting after" in e["event"] for e in library), library
    assert all(e["level"] in {"warning", "error", "critical"} for e in library)


async def test_redis_connections_and_commands_per_second_in_stats_and_metrics(
    names: Names, amqp: object, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    """Against the real Redis, the stats' ``redis`` section and /metrics of a replica report the
    connections Redis has open (the replica's and this test's at least) and its commands per second."""
    replicas = Replicas(tmp_path)
    try:
        replica = replicas.start(names.env())
        await replica.started()
        await redis_client.ping()
        port = replica.stats_port
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            async with session.get(f"http://127.0.0.1:{port}/api/monitoring/stats") as response:
                section = orjson.loads(await response.read())["redis"]
            async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
                exposition = await response.text()
    finally:
        replicas.close()
    assert section["connected_clients"] >= 2
    assert isinstance(section["instantaneous_ops_per_sec"], int)
    assert section["instantaneous_ops_per_sec"] >= 0
    figures = dict(re.findall(r"^(neiromatrius_redis_\w+) (\S+)$", exposition, re.MULTILINE))
    assert float(figures["neiromatrius_redis_connected_clients"]) >= 2
    assert float(figures["neiromatrius_redis_ops_per_second"]) >= 0
    assert float(figures["neiromatrius_redis_used_memory_bytes"]) > 0


def run_check(env: dict[str, str]) -> tuple[int, list[str]]:
    """``neiromatrius-worker check`` in a process of its own: its exit code and output lines."""
    return run_cli(env, "check")


def classifier_line(lines: list[str]) -> str:
    (found,) = [entry for entry in lines if entry[6:].startswith("classifier")]
    return found


async def test_check_contacts_the_llm_endpoint(names: Names, tmp_path: Path) -> None:
    """``check`` with CLASSIFIER=llm asks the endpoint: a served model is ok (exit 0), a closed
    port is unreachable, a model the endpoint does not list names LLM_MODEL, a refused key names
    LLM_API_KEY (without showing it), all exit 1; and its columns line up."""
    key = f"sk-check-{uuid.uuid4().hex}"
    async with FakeLLM() as served, FakeLLM() as refusing:
        refusing.models_status = 401
        closed = f"http://127.0.0.1:{free_port()}/v1"
        base = names.env(redis=False)
        envs = {
            "served": replica_env(served, base, LLM_API_KEY=key),
            "closed": {**replica_env(served, base), "LLM_BASE_URL": closed},
            "unlisted": replica_env(served, base, LLM_MODEL="gpt-typo"),
            "refused": replica_env(refusing, base, LLM_API_KEY=key),
        }
        results = await asyncio.gather(*(asyncio.to_thread(run_check, e) for e in envs.values()))
        outcomes = dict(zip(envs, results, strict=True))
    code, lines = outcomes["served"]
    assert code == 0, lines
    assert classifier_line(lines).startswith("ok    classifier  llm:v1:test-model:")
    assert classifier_line(lines).endswith("model 'test-model' listed by GET /models")
    assert served.models_requests.count(f"Bearer {key}") == 1
    assert {entry[:18] for entry in lines} == {
        "info  redis       ",
        "ok    rabbitmq    ",
        "ok    classifier  ",
    }
    code, lines = outcomes["closed"]
    assert code == 1
    assert classifier_line(lines).startswith("FAIL  classifier  llm:")
    assert "unreachable (ConnectError" in classifier_line(lines)
    code, lines = outcomes["unlisted"]
    assert code == 1
    assert "'gpt-typo' is not among the 1 GET /models lists (test-model)" in classifier_line(lines)
    assert classifier_line(lines).endswith("check LLM_MODEL")
    code, lines = outcomes["refused"]
    assert code == 1
    assert classifier_line(lines).endswith("HTTP 401, the key was refused: check LLM_API_KEY")
    assert all(key[9:] not in entry for _, out in outcomes.values() for entry in out)


async def test_check_falls_back_to_a_one_token_completion(names: Names, tmp_path: Path) -> None:
    """Against an endpoint without GET /models (404), ``check`` sends one chat completion of one
    token for LLM_MODEL and reports that the model answered."""
    async with FakeLLM() as llm:
        llm.models = None
        code, lines = await asyncio.to_thread(run_check, replica_env(llm, names.env(redis=False)))
    assert code == 0, lines
    assert classifier_line(lines).endswith(
        "model 'test-model' answered a one-token completion (no GET /models)"
    )
    (request,) = llm.requests
    assert request.model == "test-model"
    assert request.body["max_tokens"] == 1


class Terminal(io.StringIO):
    """A stderr that says it is a terminal, and tells when the progress line first shows."""

    def __init__(self) -> None:
        super().__init__()
        self.progress_shown = asyncio.Event()

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if "published" in text:
            self.progress_shown.set()
        return super().write(text)


async def test_an_interrupted_demo_says_so_on_a_line_of_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Interrupted (Ctrl-C sets the stop event) while its progress line is on a terminal, the
    demo ends that line before saying it was interrupted, and exits 130."""
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    settings = load_settings(rabbitmq_url=RABBITMQ_URL)
    options = DemoOptions(replicas=1, messages=20_000, rate_per_s=500, no_redis=True)
    stop = asyncio.Event()
    demo = asyncio.get_running_loop().create_task(run_demo(settings, options, stop))
    await asyncio.wait_for(terminal.progress_shown.wait(), timeout=30)
    stop.set()
    assert await asyncio.wait_for(demo, timeout=60) == 130
    last_progress = terminal.getvalue().split("\r\x1b[K")[-1]
    assert re.fullmatch(
        r"[^\n]*in flight \d+\n"
        r"demo: interrupted; replicas stopped and the run's queues and keys removed\n",
        last_progress,
    ), last_progress
