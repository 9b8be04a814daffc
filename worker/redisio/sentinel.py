"""Redis behind Sentinel: a client that always talks to the current master.

``REDIS_URL=redis+sentinel://[:password@]host1:26379,host2:26379/MASTER_NAME/DB`` (parsed by
``worker.core.sentinel_url``) gives a ``redis.asyncio.sentinel.Sentinel(...).master_for(...)``
client. Its connections ask the sentinels for the master's address whenever they (re)connect, but a
connection that stays open keeps its server: after a ``SENTINEL FAILOVER`` the old master goes on
taking writes until the sentinels demote it (up to ten seconds later, their INFO period), then
resyncs from the new master and discards them. So the client also asks the sentinels for the
master every ``FOLLOW_INTERVAL_S`` (``follow_master``, started by the link) and, when they name a
new one, closes every connection, in use or not: the calls on them fail as "unavailable" (see
``worker.redisio.link``) and the next ones go to the new master. A demoted master answers writes
with ``READONLY``: redis-py's sentinel connection then drops itself and raises ``ConnectionError``
("The previous master is now a slave"), counted the same way, and the link's recovery PING runs on
a new connection, which asks the sentinels again.

The sentinels get the same timeouts as the master, and ``REDIS_SENTINEL_PASSWORD`` when they
need one; TLS (``rediss+sentinel://``) and the URL's query parameters apply to both.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any
from urllib.parse import urlencode

import structlog
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.connection import parse_url
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import RedisError, ResponseError

from worker.core.sentinel_url import SentinelUrl, parse_sentinel_url

log = structlog.get_logger("worker.redis")

# How often the sentinels are asked whether the master changed.
FOLLOW_INTERVAL_S = 0.25
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
    """The master's client; ``follow_master`` watches the sentinels for a new master, and
    closing the client closes the connections to the sentinels too."""

    _following: asyncio.Task[None] | None = None

    def follow_master(self, interval_s: float = FOLLOW_INTERVAL_S) -> None:
        """Ask the sentinels for the master every ``interval_s``, and move every connection at
        once when they name another one (see the module docstring)."""
        if self._following is None:
            loop = asyncio.get_running_loop()
            self._following = loop.create_task(self._follow(interval_s))

    async def _follow(self, interval_s: float) -> None:
        pool = self.connection_pool
        while True:
            await asyncio.sleep(interval_s)
            try:
                address = await pool.sentinel_manager.discover_master(pool.service_name)  # type: ignore[attr-defined]
            except (RedisError, OSError):
                continue  # no sentinel answers: the connections keep the master they have
            known = pool.master_address  # type: ignore[attr-defined]
            if known is not None and tuple(address) != tuple(known):
                log.info(
                    "redis_master_switched",
                    old=f"{known[0]}:{known[1]}",
                    new=f"{address[0]}:{address[1]}",
                )
                pool.master_address = address  # type: ignore[attr-defined]
                # In-use connections too: an old master takes writes until the sentinels
                # demote it, and then discards them.
                await pool.disconnect(inuse_connections=True)

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        if self._following is not None:
            self._following.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._following
            self._following = None
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
