"""Redis behind Sentinel: a client that always talks to the current master.

``REDIS_URL=redis+sentinel://[:password@]host1:26379,host2:26379/MASTER_NAME/DB`` (parsed by
``worker.core.sentinel_url``) gives a ``redis.asyncio.sentinel.Sentinel(...).master_for(...)``
client. Its connections ask the sentinels for the master's address whenever they (re)connect, so a
replica follows the master through a failover without a restart. A demoted master answers writes
with ``READONLY``: redis-py's sentinel connection then drops itself and raises ``ConnectionError``
("The previous master is now a slave"), which the link counts as "unavailable" (see
``worker.redisio.link``); the link's recovery PING runs on a new connection, which asks the
sentinels again, so the new master is found at once instead of after a timeout.

The sentinels get the same timeouts as the master, and ``REDIS_SENTINEL_PASSWORD`` when they
need one; TLS (``rediss+sentinel://``) and the URL's query parameters apply to both.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from redis.asyncio import Redis, RedisCluster
from redis.asyncio.connection import parse_url
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import ResponseError

from worker.core.sentinel_url import SentinelUrl, parse_sentinel_url

# What redis-py's ``parse_url`` sets that the sentinel connection pool decides for itself.
_POOL_OWNED = frozenset({"host", "port", "path", "connection_class", "db", "username", "password"})


def connection_options(parsed: SentinelUrl, timeout_s: float) -> dict[str, Any]:
    """The master's connection keywords: the URL's query parameters, read the way redis-py reads
    those of a ``redis://`` URL, plus TLS and the timeouts ``make_redis`` uses."""
    scheme = "rediss" if parsed.tls else "redis"
    options = {
        key: value
        for key, value in parse_url(f"{scheme}://sentinel/?{urlencode(parsed.options)}").items()
        if key not in _POOL_OWNED
    }
    if parsed.tls:
        options["ssl"] = True
    options.update(
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry_on_timeout=False,
        health_check_interval=0,
    )
    return options


class SentinelMasterRedis(Redis):
    """The master's client; closing it closes the connections to the sentinels too."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        manager = getattr(self.connection_pool, "sentinel_manager", None)
        for client in getattr(manager, "sentinels", ()):
            await client.aclose()


def make_sentinel_redis(url: str, timeout_s: float, *, sentinel_password: str = "") -> Redis:
    """A client of the master ``url`` names, found through its sentinels."""
    parsed = parse_sentinel_url(url)
    options = connection_options(parsed, timeout_s)
    sentinel_options = dict(options)
    if sentinel_password:
        sentinel_options["password"] = sentinel_password
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        list(parsed.sentinels), min_other_sentinels=0, sentinel_kwargs=sentinel_options
    )
    client: SentinelMasterRedis = sentinel.master_for(
        parsed.master_name,
        redis_class=SentinelMasterRedis,
        db=parsed.db,
        username=parsed.username,
        password=parsed.password,
        **options,
    )
    return client


async def server_mode(client: Redis | RedisCluster) -> object:
    """``standalone``, ``cluster`` or ``sentinel`` as ``HELLO`` says (``None`` before Redis 6):
    a sentinel's port answers PING like a server, and only this tells the two apart."""
    try:
        hello = await client.execute_command("HELLO")
    except ResponseError:
        return None
    return _hello_field(hello, b"mode")


def _hello_field(hello: object, name: bytes) -> object:
    """A field of ``HELLO``'s answer (a flat list in RESP2, a map in RESP3)."""
    if isinstance(hello, dict):
        return hello.get(name, hello.get(name.decode()))
    if isinstance(hello, list):
        pairs = dict(zip(hello[::2], hello[1::2], strict=False))
        return pairs.get(name)
    return None
