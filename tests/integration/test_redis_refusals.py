"""Redis that refuses the worker (a sentinel's port, a wrong password, a user without EVALSHA) is
said once, with the fix, in the log and in ``check``; readiness answers 503 and nothing is
processed until it is fixed, then everything once."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests.conftest import Names
from tests.integration.redis_sentinel import SentinelDeployment
from tests.integration.servers import SpareRedis
from tests.integration.support import Replicas, ResultSink, body, publish_bodies, run_cli
from tests.integration.test_redis_acl import PASSWORD, documented_acl_line
from worker.redisio.link import REFUSED_LINE

pytestmark = pytest.mark.integration

HELD_S = 3.0  # how long the test watches the replica hold its deliveries


def http_get(port: int, path: str) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, dict(json.loads(response.read()))
    except urllib.error.HTTPError as error:
        return error.code, dict(json.loads(error.read()))


async def refused_replica(
    names: Names, tmp_path: Path, url: str, fix: str, sink: ResultSink
) -> tuple[Replicas, list[dict[str, object]]]:
    """A replica on ``url`` with 20 messages published: it logs the refusal once with ``fix``,
    answers 503, processes nothing and writes no traceback; ``check`` fails in one line."""
    env = names.env(REDIS_URL=url, REDIS_KEY_PREFIX="neiromatrius:")
    replicas = Replicas(tmp_path)
    replica = replicas.start(env)
    await replica.started()
    messages = [body(f"refused-{i}", f"Где мой заказ {i}?") for i in range(20)]
    await publish_bodies(names, messages)
    await replica.wait_for_log(REFUSED_LINE, timeout_s=10)
    await asyncio.sleep(HELD_S)
    assert sink.total == 0
    status, ready = await asyncio.to_thread(http_get, replica.stats_port, "/health/ready")
    assert status == 503
    assert fix in str(ready["reason"])
    log = replica.log_text()
    refusals = [line for line in log.splitlines() if REFUSED_LINE in line]
    assert len(refusals) == 1, refusals
    assert fix in refusals[0]
    assert "Traceback" not in log
    assert PASSWORD not in log
    assert "wrong-pw" not in log

    code, lines = await asyncio.to_thread(run_cli, env, "check")
    assert code == 1
    redis_lines = [line for line in lines if line.split()[1:2] == ["redis"]]
    assert len(redis_lines) == 1, lines
    assert redis_lines[0].startswith("FAIL"), lines
    assert fix in redis_lines[0], lines
    assert not any("Traceback" in line for line in lines)
    return replicas, messages


async def test_a_sentinel_port_is_named_as_such(names: Names, amqp: object, tmp_path: Path) -> None:
    """REDIS_URL at a sentinel's port: the log, readiness and ``check`` say to use
    redis+sentinel://, and no message is processed."""
    deployment = SentinelDeployment(tmp_path, sentinels=1).start()
    replicas = None
    try:
        async with ResultSink(names) as sink:
            url = f"redis://127.0.0.1:{deployment.sentinel_ports[0]}/0"
            replicas, _ = await refused_replica(names, tmp_path, url, "redis+sentinel://", sink)
    finally:
        if replicas is not None:
            replicas.close()
        deployment.stop()


async def test_a_wrong_password_is_named_as_such(
    names: Names, amqp: object, tmp_path: Path
) -> None:
    """A wrong password: the log, readiness and ``check`` say to check it (never showing it),
    and no message is processed (no fall back to memory either)."""
    spare = SpareRedis(tmp_path, password="right-pw").start()
    replicas = None
    try:
        async with ResultSink(names) as sink:
            url = f"redis://:wrong-pw@127.0.0.1:{spare.port}/0"
            fix = "check the user and password in REDIS_URL"
            replicas, _ = await refused_replica(names, tmp_path, url, fix, sink)
    finally:
        if replicas is not None:
            replicas.close()
        spare.stop()


async def test_a_user_without_evalsha_waits_for_the_acl_then_processes_once(
    names: Names, amqp: object, tmp_path: Path
) -> None:
    """A user without EVALSHA: the log, readiness and ``check`` name the ACL to grant; once it is
    granted (no restart) every held message is processed exactly once."""
    spare = SpareRedis(tmp_path).start()
    admin = aioredis.Redis(port=spare.port)
    replicas = None
    try:
        acl = [word for word in documented_acl_line() if word != "+evalsha"]
        await admin.execute_command(*acl)
        async with ResultSink(names) as sink:
            url = f"redis://neiromatrius:{PASSWORD}@127.0.0.1:{spare.port}/0"
            replicas, messages = await refused_replica(names, tmp_path, url, "+evalsha", sink)
            await admin.execute_command("ACL", "SETUSER", "neiromatrius", "+evalsha")
            await sink.wait_for_ids({m["message_id"] for m in messages}, timeout_s=20)
            await sink.settle(quiet_s=1.0)
            assert sink.total == len(messages)
            (replica,) = list(replicas)
            status, _ = await asyncio.to_thread(http_get, replica.stats_port, "/health/ready")
            assert status == 200
    finally:
        if replicas is not None:
            replicas.close()
        await admin.aclose()
        spare.stop()
