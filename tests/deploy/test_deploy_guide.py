"""The operator guide, deploy/README.md, agrees with the files it describes."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from deploy_support import DOKPLOY_REDIS_FILE, OPERATOR_GUIDE, REPO

MEASUREMENT_SCRIPT = "bench/redis_memory.py"


def _guide() -> str:
    return OPERATOR_GUIDE.read_text(encoding="utf-8")


def test_guide_uses_the_exact_words_operators_rely_on() -> None:
    """The guide quotes the contract's log lines, stats fields, URLs and commands verbatim."""
    guide = _guide()
    for phrase in (
        "✅ Redis cache connected",
        "⚠️ Redis connection failed",
        '{"cache": {"status": "redis_connected", "type": "redis"}}',
        '{"cache": {"status": "memory", "type": "memory"}}',
        "/api/monitoring/stats",
        "REDIS_URL=redis://neiromatrius-redis:6379/0",
        "rediss://",
        "neiromatrius-network",
        "--scale worker=",
        "docker compose port --index",
        "--maxmemory 256mb --maxmemory-policy noeviction",
        "--maxmemory-policy allkeys-lru",
        "REDIS_CACHE_URL=redis://neiromatrius-redis-cache:6379/0",
    ):
        assert phrase in guide, f"deploy/README.md does not mention {phrase!r}"


def test_guide_covers_the_three_redis_options() -> None:
    """The guide has the source document's three options: Dokploy service, managed, none."""
    headings = re.findall(r"^## (.+)$", _guide(), flags=re.MULTILINE)
    for option in ("Option 1: a Redis service in Dokploy", "Option 2", "Option 3: no Redis"):
        assert any(h.startswith(option) for h in headings), f"no section {option!r}"
    compose_path = DOKPLOY_REDIS_FILE.relative_to(REPO).as_posix()
    assert f"./{compose_path}" in _guide(), "Dokploy's Compose Path must be the file's real path"


# The guide's sentence for each measured figure, and the script's field that measures it.
FIGURES = {
    "bytes_per_id": r"Memory per remembered message ID: `([^`]+)` bytes",
    "bytes_per_cache_entry": r"Memory per cached classification: `([^`]+)` bytes",
}


def _documented(field: str) -> float:
    figure = re.search(FIGURES[field], _guide())
    assert figure, f"the sizing sentence for {field} is missing"
    assert re.fullmatch(r"[0-9][0-9,]*(\.[0-9]+)?", figure.group(1)), (
        f"{figure.group(1)!r} is not a measured number: run python {MEASUREMENT_SCRIPT}"
    )
    return float(figure.group(1).replace(",", ""))


def test_memory_sizing_figures_come_from_the_measurement_script() -> None:
    """The bytes per remembered message ID and per cached classification in the guide are
    measured numbers from a script here, with the sizing rule they feed."""
    guide = _guide()
    assert f"python {MEASUREMENT_SCRIPT}" in guide
    assert (REPO / MEASUREMENT_SCRIPT).is_file(), f"{MEASUREMENT_SCRIPT} is missing"
    for field in FIGURES:
        assert _documented(field) > 0
    assert "bytes_per_id × IDs per DEDUP_TTL_S" in guide


@pytest.mark.integration
def test_memory_sizing_figures_match_a_fresh_measurement() -> None:
    """The documented bytes per ID and per cache entry agree (within 15 %) with what the script
    measures now, on a redis-server of its own (nothing else writing to it)."""
    done = subprocess.run(
        [sys.executable, str(REPO / MEASUREMENT_SCRIPT), "--count", "30000"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        cwd=REPO,
    )
    measured = json.loads(done.stdout)
    assert measured["claim_and_attempt_keys_left"] == 0, "a processed ID keeps only its marker"
    for field in FIGURES:
        documented = _documented(field)
        assert abs(measured[field] - documented) / documented < 0.15, (field, measured, documented)
