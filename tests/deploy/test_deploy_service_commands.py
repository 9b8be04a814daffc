"""The Compose files' Redis and RabbitMQ commands, run for real on this machine.

No Docker engine is here, but redis-server, redis-cli and rabbitmq-diagnostics are: each Redis
command line starts a private redis-server on a free 127.0.0.1 port (never the shared one), and the
healthchecks run as Docker would run them, through `sh -c`.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
from deploy_support import (
    COMPOSE_FILE,
    DOKPLOY_REDIS_FILE,
    command_words,
    healthcheck_shell,
    load_yaml,
    service_environment,
)
from redis.backoff import NoBackoff
from redis.retry import Retry

REDIS = "neiromatrius-redis"
CACHE_REDIS = "neiromatrius-redis-cache"
PASSWORD = "pa ss'word\"with$symbols"

pytestmark = pytest.mark.skipif(
    not (shutil.which("redis-server") and shutil.which("redis-cli")),
    reason="redis-server and redis-cli are needed",
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _executable(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


class PrivateRedis:
    """A redis-server started from a compose service's command, as its container would start it."""

    def __init__(self, tmp_path: Path, service: Mapping[str, Any], env: dict[str, str]) -> None:
        self.port = _free_port()
        self.service = service
        data = tmp_path / "data"
        data.mkdir()
        # Stand-ins for the image: its entrypoint, and a redis-cli that talks to this server's port.
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        overrides = f"--port {self.port} --bind 127.0.0.1 --dir {data} --daemonize no"
        _executable(bin_dir / "docker-entrypoint.sh", f'#!/bin/sh\nexec "$@" {overrides}\n')
        redis_cli = shutil.which("redis-cli")
        _executable(bin_dir / "redis-cli", f'#!/bin/sh\nexec {redis_cli} -p {self.port} "$@"\n')
        self.env = {**os.environ, **env, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
        self.env.pop("REDISCLI_AUTH", None)
        self._bin_dir = bin_dir

    def argv(self) -> list[str]:
        words = command_words(self.service, self.env)
        if words[0] == "redis-server":  # exec form: the image's entrypoint receives it
            return [str(self._bin_dir / "docker-entrypoint.sh"), *words]
        return words

    @contextmanager
    def running(self) -> Iterator[subprocess.Popen[bytes]]:
        process = subprocess.Popen(
            self.argv(), env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                    break
                except OSError:
                    assert process.poll() is None, process.communicate()[0].decode()
                    assert time.monotonic() < deadline, "redis-server did not start"
                    time.sleep(0.05)
            yield process
        finally:
            process.terminate()
            process.wait(timeout=10)

    def healthcheck(self, env: Mapping[str, str]) -> int:
        script = healthcheck_shell(self.service)
        merged = {**self.env, **env}
        return subprocess.run(["sh", "-c", script], env=merged, check=False, timeout=10).returncode

    def client(self, password: str | None = None) -> redis.Redis:
        # No retries: a refused password must fail at once, not after redis-py's backoff.
        return redis.Redis(
            host="127.0.0.1", port=self.port, password=password, retry=Retry(NoBackoff(), 0)
        )


def _config(client: redis.Redis) -> dict[str, str]:
    config: dict[str, str] = {}
    for name in ("maxmemory", "maxmemory-policy", "appendonly", "save"):
        config.update(client.config_get(name))  # type: ignore[arg-type]
    return config


def _assert_configured(client: redis.Redis) -> None:
    config = _config(client)
    del config["save"]
    assert config == {
        "maxmemory": str(256 * 1024 * 1024),
        "maxmemory-policy": "noeviction",
        "appendonly": "yes",
    }


def _assert_cache_configured(client: redis.Redis) -> None:
    assert _config(client) == {
        "maxmemory": str(128 * 1024 * 1024),
        "maxmemory-policy": "allkeys-lru",
        "appendonly": "no",
        "save": "",
    }


@pytest.mark.parametrize("path", [COMPOSE_FILE, DOKPLOY_REDIS_FILE], ids=lambda p: p.name)
def test_cache_redis_command_evicts_and_persists_nothing(tmp_path: Path, path: Path) -> None:
    """Each Compose file's cache Redis command starts a redis-server with 128 MB, allkeys-lru,
    no snapshots and no append-only file, and its healthcheck passes."""
    service = load_yaml(path)["services"][CACHE_REDIS]
    env = service_environment(service)
    server = PrivateRedis(tmp_path, service, env)
    with server.running():
        _assert_cache_configured(server.client())
        assert server.healthcheck(env) == 0


def test_local_redis_command_configures_memory_and_eviction(tmp_path: Path) -> None:
    """docker-compose.yml's Redis command starts a redis-server with 256 MB, noeviction and AOF,
    and its healthcheck passes."""
    service = load_yaml(COMPOSE_FILE)["services"][REDIS]
    server = PrivateRedis(tmp_path, service, {})
    with server.running():
        _assert_configured(server.client())
        assert server.healthcheck({}) == 0


def test_dokploy_redis_without_password_needs_none(tmp_path: Path) -> None:
    """With REDIS_PASSWORD unset the Dokploy Redis starts configured, open, and healthy."""
    service = load_yaml(DOKPLOY_REDIS_FILE)["services"][REDIS]
    env = service_environment(service)
    server = PrivateRedis(tmp_path, service, env)
    with server.running():
        _assert_configured(server.client())
        assert server.healthcheck(env) == 0


def test_dokploy_redis_password_comes_from_the_environment(tmp_path: Path) -> None:
    """With REDIS_PASSWORD set the Dokploy Redis refuses clients without it, accepts it verbatim
    (spaces, quotes, dollars), and its healthcheck authenticates with it."""
    service = load_yaml(DOKPLOY_REDIS_FILE)["services"][REDIS]
    env = service_environment(service, {"REDIS_PASSWORD": PASSWORD})
    assert env["REDIS_PASSWORD"] == PASSWORD
    server = PrivateRedis(tmp_path, service, env)
    with server.running():
        with pytest.raises(redis.AuthenticationError):
            server.client().ping()
        _assert_configured(server.client(PASSWORD))
        assert server.healthcheck(env) == 0
        assert server.healthcheck({**env, "REDIS_PASSWORD": "wrong"}) != 0


@pytest.mark.integration
@pytest.mark.skipif(not shutil.which("rabbitmq-diagnostics"), reason="no rabbitmq-diagnostics")
def test_rabbitmq_healthcheck_command_passes_on_a_live_node() -> None:
    """docker-compose.yml's RabbitMQ healthcheck is a command that succeeds on a running node."""
    service = load_yaml(COMPOSE_FILE)["services"]["rabbitmq"]
    script = healthcheck_shell(service)
    result = subprocess.run(
        ["sh", "-c", script], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
