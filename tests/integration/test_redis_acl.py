"""The least-privilege Redis user deploy/README.md documents is enough for everything the worker does."""

from __future__ import annotations

import asyncio
import json
import shlex
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests.conftest import Names
from tests.integration.servers import SpareRedis
from tests.integration.support import Replicas, ResultSink, body, publish_bodies, run_cli
from worker.redisio.link import REFUSED_LINE

pytestmark = pytest.mark.integration

README = Path(__file__).resolve().parents[2] / "deploy" / "README.md"
MARK = "<!-- acl-setuser -->"
PASSWORD = "acl-test-pw"


def documented_acl_line() -> list[str]:
    """The ``ACL SETUSER`` line under the README's marker, as arguments, with the test's password."""
    after = README.read_text(encoding="utf-8").split(MARK, 1)[1]
    block = after.split("```", 2)[1]
    line = next(text for text in block.splitlines() if text.startswith("ACL SETUSER"))
    return [word.replace("CHANGE_ME", PASSWORD) for word in shlex.split(line)]


def http_get(port: int, path: str) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, dict(json.loads(response.read()))
    except urllib.error.HTTPError as error:
        return error.code, dict(json.loads(error.read()))


@pytest.fixture
async def acl_redis(tmp_path: Path) -> object:
    spare = SpareRedis(tmp_path).start()
    client = aioredis.Redis(port=spare.port)
    try:
        await client.execute_command(*documented_acl_line())
    finally:
        await client.aclose()
    yield spare
    spare.stop()


async def test_the_documented_acl_user_processes_checks_and_reports(
    names: Names, amqp: object, tmp_path: Path, acl_redis: SpareRedis
) -> None:
    """Under the README's ACL user (default prefix, no INFO): a replica processes every unique
    message once and counts the duplicates, the stats endpoint and readiness answer 200 with the
    memory "not permitted", and ``check`` and ``stats`` succeed, with no refusal or traceback."""
    url = f"redis://neiromatrius:{PASSWORD}@127.0.0.1:{acl_redis.port}/0"
    env = names.env(REDIS_URL=url, REDIS_KEY_PREFIX="neiromatrius:")
    replicas = Replicas(tmp_path)
    try:
        async with ResultSink(names) as sink:
            replica = replicas.start(env)
            await replica.started()
            unique = [body(f"acl-{i}", f"Где мой заказ {i}?") for i in range(60)]
            await publish_bodies(names, unique + unique[:15])
            await sink.wait_for_ids({m["message_id"] for m in unique}, timeout_s=30)
            await sink.settle(quiet_s=1.0)
            assert all(len(results) == 1 for results in sink.by_id.values())

            port = replica.stats_port
            ready, why = await asyncio.to_thread(http_get, port, "/health/ready")
            assert ready == 200, why
            status, stats = await asyncio.to_thread(http_get, port, "/api/monitoring/stats")
            assert status == 200
            assert stats["cache"] == {"status": "redis_connected", "type": "redis"}
            assert stats["redis"] == {"memory": "not permitted"}, stats.get("error")
            assert len(stats["replicas"]) == 1  # type: ignore[arg-type]
            assert stats["counters"]["duplicates"] == 15  # type: ignore[index]
            assert stats["replica"]["background_errors"] == {}  # type: ignore[index]

            code, lines = await asyncio.to_thread(run_cli, env, "check")
            assert code == 0, lines
            assert any("INFO not permitted" in line for line in lines), lines
            code, lines = await asyncio.to_thread(run_cli, env, "stats", "--json")
            assert code == 0, lines
            assert '"memory": "not permitted"' in "\n".join(lines)
            assert not any("Traceback" in line for line in lines)
        log = replica.log_text()
        assert REFUSED_LINE not in log
        assert "Traceback" not in log
    finally:
        replicas.close()
