"""TLS to Redis as deploy/README.md documents it: ``rediss://`` with the ``ssl_ca_certs`` and
``ssl_cert_reqs`` URL parameters, which redis-py's ``from_url`` passes to its TLS connection."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Names
from tests.integration.servers import TlsRedis, make_tls_files
from tests.integration.support import run_cli

pytestmark = pytest.mark.integration


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[TlsRedis]:
    directory = tmp_path / "tls"
    directory.mkdir()
    server = TlsRedis(directory).start()
    try:
        yield server
    finally:
        server.stop()


def _redis_line(lines: list[str], name: str = "redis") -> str:
    (found,) = [line for line in lines if line.split()[1:2] == [name]]
    return found


async def test_check_connects_with_the_right_ca_and_refuses_a_wrong_one(
    names: Names, tls_redis: TlsRedis, tmp_path: Path
) -> None:
    """``ssl_ca_certs`` naming the server's CA connects; another CA fails with one line saying
    the certificate was not verified (no traceback); ``ssl_cert_reqs=none`` connects without a
    CA; ``ssl_cert_reqs=required`` (the default) without a CA fails the same way: the system's
    CAs do not know the server."""
    other = tmp_path / "other-ca"
    other.mkdir()
    wrong_ca, _, _ = make_tls_files(other)
    plain = f"rediss://127.0.0.1:{tls_redis.port}/0"
    cases = {
        f"{plain}?ssl_ca_certs={tls_redis.ca}": True,
        f"{plain}?ssl_ca_certs={wrong_ca}": False,
        f"{plain}?ssl_cert_reqs=none": True,
        f"{plain}?ssl_cert_reqs=required": False,
    }
    for url, connects in cases.items():
        code, lines = await asyncio.to_thread(run_cli, names.env(REDIS_URL=url), "check")
        line = _redis_line(lines)
        assert "Traceback" not in "\n".join(lines)
        if connects:
            assert line.startswith("ok    redis"), (url, lines)
            assert "(Redis " in line
        else:
            assert code == 1, (url, lines)
            assert line.startswith("FAIL  redis"), (url, lines)
            assert "CERTIFICATE_VERIFY_FAILED" in line


async def test_the_cache_redis_takes_the_same_tls_parameters(
    names: Names, tls_redis: TlsRedis
) -> None:
    """REDIS_CACHE_URL=rediss://...?ssl_ca_certs=... connects too, and ``check`` shows it."""
    env = names.env(REDIS_CACHE_URL=tls_redis.url)
    code, lines = await asyncio.to_thread(run_cli, env, "check")
    assert code == 0, lines
    assert "ssl_ca_certs=" in _redis_line(lines, "cache-redis")


@pytest.mark.parametrize(
    ("query", "says"),
    [
        ("ssl_cert_reqs=sometimes", "ssl_cert_reqs must be one of none, optional, required"),
        ("ssl_ca_certs=/no/such/ca.pem", "ssl_ca_certs: no such file '/no/such/ca.pem'"),
    ],
)
async def test_a_tls_parameter_redis_py_cannot_use_stops_start_up(
    names: Names, query: str, says: str
) -> None:
    """An unknown ``ssl_cert_reqs`` (redis-py would raise at the first connection, as a
    traceback) or a CA file that is not there stops ``run`` with one line naming REDIS_URL."""
    env = names.env(REDIS_URL=f"rediss://127.0.0.1:6380/0?{query}")
    code, lines = await asyncio.to_thread(run_cli, env, "run")
    assert code == 2
    assert lines == [f"neiromatrius-worker: invalid setting REDIS_URL: {says}"]
