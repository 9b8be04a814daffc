"""Settings: defaults, and one clear line naming the variable when a value is bad."""

from __future__ import annotations

import subprocess
import sys

import pytest

from worker.core.errors import ConfigError
from worker.core.settings import load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("REDIS_URL", "RABBITMQ_URL", "DEDUP_TTL_S", "CLASSIFIER", "PREFETCH"):
        monkeypatch.delenv(name, raising=False)


def test_defaults_match_the_contract() -> None:
    """Unset variables take the contract's defaults; no REDIS_URL means in-memory mode."""
    s = load_settings()
    assert (s.input_queue, s.results_exchange, s.dead_letter_queue) == (
        "neiromatrius.messages",
        "neiromatrius.classified",
        "neiromatrius.messages.dead",
    )
    assert (s.redis_key_prefix, s.dedup_ttl_s, s.cache_ttl_s) == ("neiromatrius:", 86400, 604800)
    assert (s.classifier, s.stats_host, s.stats_port) == ("keywords", "0.0.0.0", 8080)
    assert not s.redis_enabled


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("DEDUP_TTL_S", "-5", "invalid setting DEDUP_TTL_S"),
        ("CLASSIFIER", "magic", "invalid setting CLASSIFIER"),
        ("REDIS_URL", "http://cache:6379", "invalid setting REDIS_URL"),
        ("RABBITMQ_URL", "not a url", "invalid setting RABBITMQ_URL"),
        ("PREFETCH", "0", "invalid setting PREFETCH"),
    ],
)
def test_bad_values_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, expected: str
) -> None:
    """Each bad value raises a ``ConfigError`` whose message names the variable."""
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=expected):
        load_settings()


def test_password_in_a_bad_url_is_not_echoed(monkeypatch: pytest.MonkeyPatch) -> None:
    """A malformed URL carrying a password is reported without the password."""
    monkeypatch.setenv("REDIS_URL", "redis://:s3cr3t-pw@cache:notaport/0")
    with pytest.raises(ConfigError) as raised:
        load_settings()
    assert "REDIS_URL" in str(raised.value)
    assert "s3cr3t-pw" not in str(raised.value)


def test_bad_setting_stops_the_command_with_exit_code_2() -> None:
    """``neiromatrius-worker run`` with a negative TTL prints one line naming it and exits 2."""
    env = {"PATH": "/usr/bin:/bin", "DEDUP_TTL_S": "-1", "HOME": "/tmp"}
    done = subprocess.run(
        [sys.executable, "-m", "worker", "run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "DEDUP_TTL_S" in lines[0]
