"""What a newcomer meets in the first hour: a command that cannot do its work says why in one line
(never a traceback, never a password), with an exit code that tells a setting from an outage;
a refused broker login is reported as the configuration error it is; a dead letter keeps the
properties of the message it copies.

The commands run as real processes (``python -m worker ...``) with an environment built from
scratch, so nothing of the developer's shell reaches them.
"""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import aiohttp
import pytest

from tests.conftest import RABBITMQ_URL, REDIS_URL, Names
from tests.integration.raw_amqp import publish_without_id
from tests.integration.servers import free_port
from tests.integration.support import Replicas, drain_queue, run_cli
from worker.amqp.broker import REASON_HEADER

pytestmark = pytest.mark.integration

WRONG_PASSWORD = "not-the-password-5e1f"
LOGIN_FIX = "check the user and password in RABBITMQ_URL"


def with_password(url: str, password: str) -> str:
    """``url`` with its password (and, for AMQP, its user: guest when none) replaced."""
    parts = urlsplit(url)
    user = parts.username or ("guest" if parts.scheme.startswith("amqp") else "")
    host = f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)
    return urlunsplit(parts._replace(netloc=f"{user}:{password}@{host}"))


def closed_port_url(url: str) -> str:
    """``url`` pointing at a local port nothing listens on."""
    parts = urlsplit(url)
    credentials = parts.netloc.rpartition("@")[0]
    netloc = f"{credentials}@127.0.0.1:{free_port()}" if credentials else f"127.0.0.1:{free_port()}"
    return urlunsplit(parts._replace(netloc=netloc))


def scratch_env(**settings: str) -> dict[str, str]:
    """An environment with only what a process needs to start, plus ``settings``."""
    env = {"PATH": os.environ.get("PATH", os.defpath), "HOME": str(Path.cwd()), "PYTHONUTF8": "1"}
    for kept in ("PYTHONPATH", "AMQP_FAST_PATH"):
        if kept in os.environ:
            env[kept] = os.environ[kept]
    env.update(settings)
    return env


async def cli(env: dict[str, str], *args: str) -> tuple[int, list[str]]:
    """Run ``python -m worker ARGS`` off the event loop (``support.run_cli``)."""
    return await asyncio.to_thread(run_cli, env, *args)


async def test_a_second_replica_on_a_stats_port_in_use_says_so_in_one_line_and_exits_2(
    names: Names, amqp: object, tmp_path: Path
) -> None:
    """A second ``run`` on the STATS_PORT of a running replica prints one line naming
    STATS_PORT and suggesting STATS_PORT=0, and exits 2 (no traceback)."""
    port = str(free_port())
    replicas = Replicas(tmp_path)
    try:
        first = replicas.start(names.env(redis=False, STATS_PORT=port))
        await first.started()
        env = scratch_env(
            RABBITMQ_URL=RABBITMQ_URL,
            STATS_HOST="127.0.0.1",
            STATS_PORT=port,
            LOG_LEVEL="error",  # the start-up's lines (info, a fast path off) are not under test
            **names.variables(),
        )
        code, output = await cli(env, "run")
        assert output == [
            f"neiromatrius-worker: STATS_PORT={port}: cannot listen on 127.0.0.1:{port} "
            "(Address already in use); another replica on this host? Set STATS_PORT=0 for any "
            "free port, or another port"
        ]
        assert code == 2
        assert not first.exited
    finally:
        replicas.close()


async def test_publish_with_a_wrong_broker_password_says_so_in_one_line_and_exits_2() -> None:
    """``publish`` refused by the broker prints one line with the masked URL and the fix, and
    exits 2; the password is not in it."""
    url = with_password(RABBITMQ_URL, WRONG_PASSWORD)
    code, output = await cli(scratch_env(RABBITMQ_URL=url), "publish", "--sample", "1")
    assert len(output) == 1, output
    masked = with_password(RABBITMQ_URL, "***")
    assert output[0].startswith(
        f"neiromatrius-worker publish: RabbitMQ at {masked} refused the login ("
    )
    assert output[0].endswith(f"); {LOGIN_FIX}")
    assert WRONG_PASSWORD not in output[0]
    assert code == 2


async def test_publish_to_an_unknown_virtual_host_says_the_broker_refused_it_and_exits_2() -> None:
    """``publish`` to a virtual host the broker does not have prints one line saying the broker
    refused the connection and what to check, and exits 2 (a setting, not an outage)."""
    url = urlunsplit(urlsplit(RABBITMQ_URL)._replace(path="/no-such-vhost-5e1f"))
    code, output = await cli(scratch_env(RABBITMQ_URL=url), "publish", "--sample", "1")
    assert len(output) == 1, output
    assert " refused the connection (" in output[0]
    assert output[0].endswith(
        "); check RABBITMQ_URL (its port, virtual host and the user's permissions)"
    )
    assert code == 2


async def test_publish_with_the_broker_down_says_so_in_one_line_and_exits_1() -> None:
    """``publish`` to a port nothing listens on prints one line saying the broker is
    unreachable, what to do, and exits 1 (an outage, not a setting)."""
    url = closed_port_url(RABBITMQ_URL)
    code, output = await cli(scratch_env(RABBITMQ_URL=url), "publish", "--sample", "1")
    assert len(output) == 1, output
    where = url.replace(":guest@", ":***@")
    assert output[0].startswith(
        f"neiromatrius-worker publish: RabbitMQ at {where} is unreachable ("
    )
    assert output[0].endswith("); start it or set RABBITMQ_URL")
    assert code == 1


@pytest.mark.parametrize(
    ("url", "reason", "fix", "exit_code"),
    [
        (
            with_password(REDIS_URL, WRONG_PASSWORD),
            "AUTH",
            "; check the user and password in REDIS_URL",
            2,
        ),
        (closed_port_url(REDIS_URL), "Connect", "", 1),
    ],
    ids=["bad-password", "unreachable"],
)
async def test_stats_says_why_redis_failed_with_its_address_in_one_line(
    url: str, reason: str, fix: str, exit_code: int
) -> None:
    """``stats`` that cannot use Redis prints one line with the masked address and Redis's
    reason (as ``check`` does), exiting 2 for refused credentials and 1 for an outage."""
    code, output = await cli(scratch_env(REDIS_URL=url), "stats")
    assert len(output) == 1, output
    masked = url.replace(f":{WRONG_PASSWORD}@", ":***@")
    assert output[0].startswith(f"neiromatrius-worker stats: ⚠️ Redis connection failed: {masked}: ")
    assert reason in output[0]
    assert output[0].endswith(fix)
    assert WRONG_PASSWORD not in output[0]
    assert code == exit_code


async def test_a_refused_broker_login_is_reported_as_a_configuration_error_while_retrying(
    names: Names, tmp_path: Path
) -> None:
    """A replica whose broker login is refused logs ``broker_refused_login`` (an error, with the
    fix, no password) at each attempt, and readiness gives that reason, not "unreachable"."""
    replicas = Replicas(tmp_path)
    try:
        env = names.env(redis=False, RABBITMQ_URL=with_password(RABBITMQ_URL, WRONG_PASSWORD))
        replica = replicas.start(env)
        await replica.wait_for_log('"event":"monitoring_listening"')
        async with aiohttp.ClientSession() as http:
            await replica.wait_for_log("broker_refused_login")
            url = f"http://127.0.0.1:{replica.stats_port}/health/ready"
            async with http.get(url) as response:
                assert response.status == 503
                assert (await response.json())["reason"] == (
                    f"the broker refused the login: {LOGIN_FIX}"
                )
        await replica.wait_for_log('"retry_in_s":1.0')  # the second attempt failed too
        refusals = [e for e in replica.events() if e.get("event") == "broker_refused_login"]
        assert refusals[0]["level"] == "error"
        assert refusals[0]["fix"] == LOGIN_FIX
        assert not any(e.get("event") == "broker_unreachable" for e in replica.events())
        assert WRONG_PASSWORD not in replica.log_text()
    finally:
        replicas.close()


async def test_a_dead_letter_keeps_the_properties_of_the_message_an_absent_message_id_included(
    names: Names, amqp: aio_pika.abc.AbstractRobustConnection, tmp_path: Path
) -> None:
    """The dead-letter copy of a message sent without an AMQP ``message_id`` has none (aiormq
    would invent one), and a copy of one sent with properties keeps them and its headers."""
    sent = aio_pika.Message(
        b"not json, with properties",
        message_id="prop-7",
        correlation_id="corr-7",
        reply_to="reply.queue",
        priority=3,
        type="chat.message",
        app_id="producer-7",
        content_type="application/json",
        content_encoding="identity",
        timestamp=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        headers={"x-producer": "tests"},
    )
    replicas = Replicas(tmp_path)
    try:
        replica = replicas.start(names.env(redis=False))
        await replica.started()
        await publish_without_id(RABBITMQ_URL, names.input_queue, [b"not json, no id"])
        channel = await amqp.channel(publisher_confirms=True)
        await channel.default_exchange.publish(sent, routing_key=names.input_queue)
        dead = await drain_queue(names, names.dead_letter_queue, timeout_s=20, expected=2)
        by_body = {m.body: m for m in dead}
        assert set(by_body) == {b"not json, no id", b"not json, with properties"}
        assert by_body[b"not json, no id"].message_id is None
        copy = by_body[b"not json, with properties"]
        kept = ("message_id", "correlation_id", "reply_to", "priority", "type", "app_id")
        kept += ("content_type", "content_encoding", "timestamp")
        assert {name: getattr(copy, name) for name in kept} == {
            name: getattr(sent, name) for name in kept
        }
        assert (copy.headers or {})["x-producer"] == "tests"
        assert all((m.headers or {}).get(REASON_HEADER) == "not_json" for m in dead)
    finally:
        replicas.close()
