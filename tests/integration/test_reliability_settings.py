"""The reliability settings are checked at start-up: a bad combination stops the replica with one
line naming the variable and exit code 2, before it touches Redis or RabbitMQ."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import Names

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"REDIS_FAILURE_MODE": "sometimes"}, "REDIS_FAILURE_MODE"),
        ({"REDIS_FAILURE_MODE": "strict", "REDIS_URL": ""}, "REDIS_FAILURE_MODE=strict"),
        ({"REDIS_FALLBACK_AFTER_S": "-1"}, "REDIS_FALLBACK_AFTER_S"),
        ({"WORK_TIMEOUT_S": "900"}, "WORK_TIMEOUT_S"),
        (
            {"WORK_TIMEOUT_S": "900", "RABBITMQ_CONSUMER_TIMEOUT_S": "1000"},
            "RABBITMQ_CONSUMER_TIMEOUT_S",
        ),
    ],
)
def test_bad_reliability_settings_stop_start_up(
    names: Names, settings: dict[str, str], named: str
) -> None:
    """Each bad value or combination exits with code 2 and one line that names the variable."""
    env = {**names.env(), **settings}
    done = subprocess.run(
        [sys.executable, "-m", "worker", "run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert named in lines[0]


def test_strict_mode_with_redis_and_a_long_consumer_timeout_is_accepted(names: Names) -> None:
    """Strict mode with a REDIS_URL, and a long WORK_TIMEOUT_S under a raised consumer timeout,
    pass validation (``check`` runs and reports on the connections)."""
    env = {
        **names.env(),
        "REDIS_FAILURE_MODE": "STRICT",
        "WORK_TIMEOUT_S": "900",
        "RABBITMQ_CONSUMER_TIMEOUT_S": "3600",
    }
    done = subprocess.run(
        [sys.executable, "-m", "worker", "check"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ok    redis" in done.stdout
