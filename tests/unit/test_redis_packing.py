"""Commands packed by hiredis are byte for byte what redis-py's own packer writes."""

from __future__ import annotations

import pytest
from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection
from redis.exceptions import DataError

from worker.redisio.clients import make_redis, pack_with_hiredis

COMMANDS = [
    (
        "EVALSHA",
        "ab" * 20,
        "3",
        "k:1",
        "k:2",
        b"\x00\xffbinary",
        "юникод ✅",
        5,
        -7,
        1.5,
        0.1,
        2**70,
    ),
    ("SET", "neiromatrius:done:id", "1", "EX", 86400),
    ("CLIENT SETNAME", "replica-1"),
    (b"CLIENT SETNAME", "replica-1"),
    ("GET", ""),
]


@pytest.mark.parametrize("args", COMMANDS)
def test_hiredis_packing_matches_redis_py(args: tuple[object, ...]) -> None:
    """Each command (binary, Unicode, numbers, multi-word names) packs to redis-py's own bytes."""
    expected = b"".join(Connection().pack_command(*args))  # type: ignore[arg-type]
    assert b"".join(pack_with_hiredis(args)) == expected  # type: ignore[arg-type]


def test_an_argument_redis_cannot_take_is_a_data_error() -> None:
    """An argument Redis cannot encode fails as redis-py's ``DataError``, as with its packer."""
    with pytest.raises(DataError):
        pack_with_hiredis(("SET", "k", None))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("url", "base"),
    [
        ("redis://127.0.0.1:6379/0", Connection),
        ("rediss://127.0.0.1:6380/0", SSLConnection),
        ("unix:///tmp/redis.sock", UnixDomainSocketConnection),
    ],
)
def test_every_kind_of_connection_packs_with_hiredis(url: str, base: type) -> None:
    """TCP, TLS and Unix-socket clients made by ``make_redis`` all pack with hiredis."""
    client = make_redis(url, 1.0)
    made = client.connection_pool.connection_class
    assert issubclass(made, base)
    assert made is not base
    assert made(**client.connection_pool.connection_kwargs).pack_command("GET", "k") == [
        b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"
    ]
