"""Secrets stay secret: a Redis password never shows in a log line, a stats output or an error,
whatever happens to Redis; and Redis over TLS (``rediss://``) works."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.conftest import RABBITMQ_URL, Names
from tests.integration.servers import SpareRedis, TlsRedis
from tests.integration.support import Replicas, ResultSink, body, publish_bodies
from worker.redisio.link import CONNECTED_LINE, FAILED_LINE, REFUSED_LINE

pytestmark = pytest.mark.integration


def run_cli(env: dict[str, str], *args: str) -> str:
    """stdout and stderr of one ``neiromatrius-worker`` command."""
    done = subprocess.run(
        [sys.executable, "-m", "worker", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.stdout + done.stderr


def fetch(port: int, path: str) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
            return str(reply.read().decode())
    except urllib.error.HTTPError as error:
        return str(error.read().decode())


async def test_redis_password_appears_in_no_log_stats_or_error(
    names: Names, amqp: object, tmp_path: Path
) -> None:
    """With a password in REDIS_URL (and a wrong one in a second URL), nothing the worker prints
    holds either: debug logs of a replica across a Redis outage and its recovery, the monitoring
    endpoints, the stats command, the check command with Redis up, down and refusing the wrong
    password, a replica refused by Redis, and the start-up error of an invalid REDIS_URL."""
    password = f"pw-{uuid.uuid4().hex}"
    wrong = f"wrong-{uuid.uuid4().hex}"
    spare = SpareRedis(tmp_path, password=password).start()
    wrong_url = spare.url.replace(password, wrong)
    outputs: list[str] = []
    replicas = Replicas(tmp_path)
    try:
        async with ResultSink(names) as sink:
            env = names.env(REDIS_URL=spare.url, REDIS_TIMEOUT_S="0.5", LOG_LEVEL="debug")
            replica = replicas.start(env)
            await replica.started()
            await publish_bodies(names, [body(f"s-{i}", f"Привет {i}") for i in range(20)])
            await sink.wait_for_ids({f"s-{i}" for i in range(20)}, timeout_s=30)
            port = replica.stats_port
            for path in ("/api/monitoring/stats", "/metrics", "/health/ready"):
                outputs.append(await asyncio.to_thread(fetch, port, path))
            outputs.append(await asyncio.to_thread(run_cli, env, "stats"))
            outputs.append(await asyncio.to_thread(run_cli, env, "stats", "--json"))
            outputs.append(await asyncio.to_thread(run_cli, env, "check"))
            wrong_env = {**env, "REDIS_URL": wrong_url}
            outputs.append(await asyncio.to_thread(run_cli, wrong_env, "check"))

            spare.stop()
            await replica.wait_for_log(FAILED_LINE)
            await publish_bodies(names, [body(f"d-{i}", f"Пока {i}") for i in range(5)])
            await sink.wait_for_ids({f"d-{i}" for i in range(5)}, timeout_s=30)
            outputs.append(await asyncio.to_thread(fetch, port, "/api/monitoring/stats"))
            outputs.append(await asyncio.to_thread(run_cli, env, "check"))
            outputs.append(await asyncio.to_thread(run_cli, env, "stats"))
            spare.start()
            await replica.wait_for_log('"recovered":true', timeout_s=15)

            refused = replicas.start(names.env(REDIS_URL=wrong_url, REDIS_TIMEOUT_S="0.5"))
            await refused.started()
            await refused.wait_for_log(REFUSED_LINE)  # a wrong password is refused, not an outage
            refused.signal(signal.SIGTERM)
            await refused.wait_exit()
            bad_port = {**env, "REDIS_URL": spare.url.replace(str(spare.port), "notaport")}
            outputs.append(await asyncio.to_thread(run_cli, bad_port, "run"))

            replica.signal(signal.SIGTERM)
            assert await replica.wait_exit() == 0
        logs = [r.log_text() for r in replicas.all]
        assert CONNECTED_LINE in logs[0]
        assert "redis://:***@127.0.0.1" in logs[0]  # the URL is shown, its password masked
        assert "invalid setting REDIS_URL" in outputs[-1]
        assert any("FAIL  redis" in output for output in outputs)
        assert '"level":"debug"' in logs[0]
        for text in [*logs, *outputs]:
            assert password not in text
            assert wrong not in text
    finally:
        replicas.close()
        spare.stop()


async def test_rabbitmq_password_appears_in_no_log_or_error(names: Names, tmp_path: Path) -> None:
    """A replica and the check command given a RabbitMQ URL with a wrong password report the
    failure without ever printing that password."""
    wrong = f"wrong-{uuid.uuid4().hex}"
    url = RABBITMQ_URL.replace("guest:guest@", f"guest:{wrong}@")
    assert wrong in url
    env = names.env(redis=False, RABBITMQ_URL=url)
    replicas = Replicas(tmp_path)
    try:
        replica = replicas.start(env)
        await replica.wait_for_log("broker_", timeout_s=20)
        await asyncio.sleep(1.0)  # a retry or two
        replica.signal(signal.SIGTERM)
        await replica.wait_exit()
        checked = await asyncio.to_thread(run_cli, env, "check")
        assert "FAIL  rabbitmq" in checked
        for text in (replica.log_text(), checked):
            assert wrong not in text
            assert "guest:***@" in text
    finally:
        replicas.close()


async def test_replica_works_with_redis_over_tls_with_a_password(
    names: Names, amqp: object, tmp_path: Path
) -> None:
    """REDIS_URL=rediss://:password@host:port/0?ssl_ca_certs=...: the replica connects over TLS,
    processes and deduplicates messages in that Redis, and never prints the password."""
    password = f"tls-{uuid.uuid4().hex}"
    tls = TlsRedis(tmp_path, password=password).start()
    replicas = Replicas(tmp_path)
    try:
        async with ResultSink(names) as sink:
            replica = replicas.start(names.env(REDIS_URL=tls.url))
            await replica.started()
            messages = [body(f"t-{i}", f"Здравствуйте {i}") for i in range(30)]
            await publish_bodies(names, messages + messages[:10])
            await sink.wait_for_ids({m["message_id"] for m in messages}, timeout_s=30)
            await sink.settle(quiet_s=1.0)
            assert sink.total == 30
            assert CONNECTED_LINE in replica.log_text()
            assert "rediss://:***@127.0.0.1" in replica.log_text()
            stats = await asyncio.to_thread(
                run_cli, names.env(REDIS_URL=tls.url), "stats", "--json"
            )
            counters = json.loads(stats[stats.index("{") :])["counters"]
            assert (counters["processed"], counters["duplicates"]) == (30, 10)
            assert password not in replica.log_text() + stats
    finally:
        replicas.close()
        tls.stop()
