"""The Docker Swarm stack file: valid Compose, accepted by `docker stack`, free of what Swarm
ignores, and running the same worker as docker-compose.yml and the Kubernetes Deployment."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from deploy_support import (
    COMPOSE_FILE,
    COMPOSE_SCHEMA,
    DOCKERFILE,
    REPO,
    interpolate,
    load_yaml,
    read_dockerfile,
    service_environment,
)

from worker.core.settings import Settings

STACK_FILE = REPO / "deploy" / "swarm" / "docker-stack.yml"
DEPLOYMENT = REPO / "deploy" / "kubernetes" / "deployment.yaml"
DEPLOY_ENV = {
    "WORKER_IMAGE": "registry.example.com/neiromatrius-worker:0.1.0",
    "RABBITMQ_URL": "amqp://neiromatrius:secret@rabbitmq:5672/",
}
# Service keys `docker stack deploy` ignores or refuses (the Docker CLI's compose loader:
# UnsupportedProperties, DeprecatedProperties), and depends_on, which Swarm does not order by.
SWARM_IGNORES = frozenset(
    {"build", "restart", "container_name", "depends_on", "expose", "links", "privileged"}
)
CLOSE_MARGIN_S = 5


def _worker() -> dict[str, Any]:
    services = load_yaml(STACK_FILE)["services"]
    assert list(services) == ["worker"], "the stack runs the workers; Redis has its own file"
    worker: dict[str, Any] = services["worker"]
    return worker


def _seconds(duration: str) -> float:
    """A Compose duration (30s, 1m30s, 500ms) in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts, f"not a duration: {duration!r}"
    assert "".join(n + u for n, u in parts) == duration, f"not a duration: {duration!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


def _bytes(quantity: str) -> float:
    """A Compose (256M: binary) or Kubernetes (256Mi) memory size in bytes."""
    match = re.fullmatch(r"(\d+)([KMG])i?[bB]?", quantity)
    assert match, f"unexpected memory size {quantity!r}"
    return float(match.group(1)) * 1024 ** " KMG".index(match.group(2))


def _docker() -> str:
    """The Docker CLI, whose `docker stack config` parses a stack file without an engine."""
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("the Docker CLI is not installed")
    probe = subprocess.run(
        [docker, "stack", "config", "--help"], capture_output=True, check=False, timeout=30
    )
    if probe.returncode != 0:
        pytest.skip("this Docker CLI has no `docker stack config`")
    return docker


def _stack_config(path: Path) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ.get("PATH", ""), **DEPLOY_ENV}
    return subprocess.run(
        [_docker(), "stack", "config", "-c", str(path)],
        capture_output=True,
        text=True,
        check=False,
        env=env,
        timeout=60,
    )


def test_stack_file_matches_the_compose_specification() -> None:
    """The stack file is valid by the Compose Specification's JSON Schema."""
    schema = json.loads(COMPOSE_SCHEMA.read_text(encoding="utf-8"))
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(load_yaml(STACK_FILE)), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_docker_stack_accepts_the_file_without_a_warning() -> None:
    """`docker stack config` (the loader of `docker stack deploy`) resolves the stack file and
    warns about nothing, the required variables set."""
    result = _stack_config(STACK_FILE)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == ""
    resolved = yaml.safe_load(result.stdout)["services"]["worker"]
    assert resolved["image"] == DEPLOY_ENV["WORKER_IMAGE"]
    assert resolved["environment"]["RABBITMQ_URL"] == DEPLOY_ENV["RABBITMQ_URL"]


def test_docker_stack_refuses_the_local_compose_file() -> None:
    """docker-compose.yml cannot be deployed as a stack as it is (the reason the stack file
    exists): the Docker CLI's loader refuses its Compose-only keys."""
    result = _stack_config(COMPOSE_FILE)
    assert result.returncode != 0
    assert re.search(r"env_file|depends_on|name", result.stderr), result.stderr


def test_stack_file_uses_nothing_swarm_ignores() -> None:
    """The worker service has no key Swarm ignores, no host port, a restart policy instead of
    `restart`, and an image every node can pull (required at deploy time)."""
    worker = _worker()
    assert not SWARM_IGNORES & set(worker), sorted(SWARM_IGNORES & set(worker))
    assert "name" not in load_yaml(STACK_FILE), "the stack name comes from the command line"
    assert "ports" not in worker, "the routing mesh would publish it on every node"
    assert worker["deploy"]["restart_policy"]["condition"] == "any"
    with pytest.raises(AssertionError, match="WORKER_IMAGE"):
        interpolate(worker["image"], {})
    with pytest.raises(AssertionError, match="RABBITMQ_URL"):
        service_environment(worker, {"WORKER_IMAGE": "x"})


def test_stack_worker_runs_like_the_local_one() -> None:
    """The stack sets every variable docker-compose.yml sets for the workers, the same stats
    port as the image and the worker, and joins the same network, created outside the stack."""
    local = service_environment(load_yaml(COMPOSE_FILE)["services"]["worker"])
    stack = service_environment(_worker(), DEPLOY_ENV)
    assert set(local) <= set(stack), sorted(set(local) - set(stack))
    port = int(stack["STATS_PORT"])
    assert port == Settings.model_fields["stats_port"].default
    _, stages = read_dockerfile(DOCKERFILE)
    image_env = {k: v for i in stages[-1].all("ENV") for k, v in i.env_pairs().items()}
    assert int(image_env["STATS_PORT"]) == port
    network = load_yaml(COMPOSE_FILE)["networks"]["neiromatrius-network"]["name"]
    assert _worker()["networks"] == [network]
    assert load_yaml(STACK_FILE)["networks"][network] == {"external": True}


def test_stop_grace_period_outlasts_the_drain_timeout() -> None:
    """Swarm waits longer after SIGTERM than the worker drains, with room to close."""
    drain = float(
        service_environment(_worker(), DEPLOY_ENV).get(
            "DRAIN_TIMEOUT_S", Settings.model_fields["drain_timeout_s"].default
        )
    )
    assert _seconds(_worker()["stop_grace_period"]) >= drain + CLOSE_MARGIN_S


def test_stack_resources_match_the_kubernetes_deployment() -> None:
    """Reservations and limits are the Kubernetes requests and limits, memory and CPU."""
    kubernetes = load_yaml(DEPLOYMENT)["spec"]["template"]["spec"]["containers"][0]["resources"]
    swarm = _worker()["deploy"]["resources"]
    for swarm_side, kubernetes_side in (("reservations", "requests"), ("limits", "limits")):
        assert _bytes(swarm[swarm_side]["memory"]) == _bytes(kubernetes[kubernetes_side]["memory"])
        cpu = str(kubernetes[kubernetes_side]["cpu"])
        cores = float(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)
        assert float(swarm[swarm_side]["cpus"]) == cores
