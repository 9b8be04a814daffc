"""``check`` against a port that does not speak AMQP says so in its one line, nothing else."""

from __future__ import annotations

import os

from tests.conftest import REDIS_URL
from tests.integration.support import run_cli


def test_check_against_a_port_that_is_not_rabbitmq_prints_only_its_lines() -> None:
    """A RABBITMQ_URL pointing at Redis's port fails in one ``FAIL rabbitmq`` line, without
    asyncio's "Task was destroyed" complaint or a traceback from a connection left reconnecting."""
    redis_port = REDIS_URL.rsplit(":", 1)[1].split("/")[0]
    env = {
        "PATH": os.environ.get("PATH", ""),
        "RABBITMQ_URL": f"amqp://guest:guest@127.0.0.1:{redis_port}/",
    }
    code, lines = run_cli(env, "check")
    assert code == 1
    assert [line.split()[:2] for line in lines] == [
        ["info", "redis"],
        ["FAIL", "rabbitmq"],
        ["ok", "classifier"],
    ], lines
