"""Building the Redis client for ``REDIS_URL`` and ``REDIS_MODE``.

``make_client`` is the one place a client is made (replica, CLI, bench). Modes:

- ``standalone``: one server, ``redis.asyncio.Redis`` (commands packed by hiredis, see
  ``packed_by_hiredis``).
- ``cluster``: ``redis.asyncio.RedisCluster``, started from the node the URL names; it learns the
  others (``CLUSTER SLOTS``), follows ``MOVED``/``ASK`` and routes each command by its key's slot.
  Every multi-key call the worker makes keeps its keys in one slot (see ``keys``).
- ``auto`` (the default): ask the server. ``INFO cluster`` says ``cluster_enabled``; a
  least-privilege user refused ``INFO`` is asked ``CLUSTER INFO`` instead (a standalone server
  answers it with an error). A server that cannot be reached is taken as standalone, and said
  so: set ``REDIS_MODE=cluster`` when replicas may start before their cluster.

- ``sentinel``: the master a ``redis+sentinel://`` URL names, found through its sentinels
  (``worker.redisio.sentinel``); ``auto`` chooses it from the URL's scheme.

``redis://host:port?cluster=true`` (the form some managed services print) forces cluster mode
like ``REDIS_MODE=cluster``; the parameter is removed before redis-py sees the URL.
"""

from __future__ import annotations

import asyncio
from enum import StrEnum
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import hiredis
import structlog
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import (
    AuthenticationError,
    DataError,
    NoPermissionError,
    RedisClusterException,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import EncodableT

from worker.core.errors import ConfigError
from worker.core.redaction import redact_url
from worker.core.sentinel_url import is_sentinel_url
from worker.core.settings import Settings
from worker.redisio.sentinel import make_sentinel_redis

log = structlog.get_logger("worker.redis")

# What ``make_client`` returns; both speak the same commands for the worker's use.
RedisClient = Redis | RedisCluster

_PROBE_UNAVAILABLE: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    OSError,
    asyncio.TimeoutError,
)
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


class RedisMode(StrEnum):
    AUTO = "auto"
    STANDALONE = "standalone"
    CLUSTER = "cluster"
    SENTINEL = "sentinel"


def is_cluster(client: RedisClient) -> bool:
    """Whether ``client`` talks to a Redis Cluster (multi-key calls must then stay in one slot)."""
    return isinstance(client, RedisCluster)


async def ping(client: RedisClient) -> None:
    """PING the server, or every master of a cluster (a replica that is down is no outage)."""
    if isinstance(client, RedisCluster):
        await client.ping(target_nodes=RedisCluster.PRIMARIES)  # type: ignore[misc]
    else:
        await client.ping()  # type: ignore[misc]


# INFO fields that add up over a cluster's masters.
_SUMMED = (
    *("used_memory", "maxmemory", "evicted_keys", "connected_clients"),
    "instantaneous_ops_per_sec",
)


async def server_info(redis: RedisClient, section: str) -> dict[str, Any]:
    """``INFO section``; on a cluster, its masters' figures summed (``masters``: how many)."""
    if not is_cluster(redis):
        found: dict[str, Any] = await redis.info(section)
        return found
    per_master: dict[str, dict[str, Any]] = await redis.info(
        section, target_nodes=RedisCluster.PRIMARIES
    )
    masters = list(per_master.values())
    merged = dict(masters[0])
    for name in _SUMMED:
        if name in merged:
            merged[name] = sum(int(m.get(name, 0)) for m in masters)
    if "used_memory" in merged and len(masters) > 1:
        merged["used_memory_human"] = f"{merged['used_memory'] / 1048576:.2f}M"
    merged["masters"] = len(masters)
    return merged


def mode_in_url(url: str) -> tuple[str, RedisMode | None]:
    """``url`` without a ``cluster=`` query parameter, and the mode that parameter asks for."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    flags = [value.strip().lower() for name, value in query if name.lower() == "cluster"]
    if not flags:
        return url, None
    if flags[-1] not in _TRUE | _FALSE:
        raise ConfigError("invalid setting REDIS_URL: cluster= must be true or false")
    rest = urlencode([(name, value) for name, value in query if name.lower() != "cluster"])
    mode = RedisMode.CLUSTER if flags[-1] in _TRUE else RedisMode.STANDALONE
    return urlunsplit(parts._replace(query=rest)), mode


async def make_client(
    url: str, mode: str, timeout_s: float, *, sentinel_password: str = "", log_assumed: bool = False
) -> RedisClient:
    """A client for ``url`` in ``mode`` (``auto`` asks the server, see the module docstring).
    ``log_assumed``: log a warning when standalone is assumed because the server cannot be asked
    (a replica does; a command reports the unreachable server in its own words)."""
    if is_sentinel_url(url):
        if RedisMode(mode) not in (RedisMode.AUTO, RedisMode.SENTINEL):
            raise ConfigError(
                f"invalid setting REDIS_MODE: {mode} does not go with a redis+sentinel:// "
                "REDIS_URL (use sentinel or auto)"
            )
        return make_sentinel_client(url, timeout_s, sentinel_password)
    url, forced = mode_in_url(url)
    chosen = forced or RedisMode(mode)
    if chosen is RedisMode.SENTINEL:
        raise ConfigError(
            "invalid setting REDIS_MODE: sentinel needs a redis+sentinel:// REDIS_URL"
        )
    if chosen is RedisMode.AUTO:
        chosen = await detect_mode(url, timeout_s, log_assumed=log_assumed)
    elif chosen is RedisMode.CLUSTER and await server_mode(url, timeout_s) is RedisMode.STANDALONE:
        raise ConfigError(
            f"invalid setting REDIS_URL: {redact_url(url)} is not a Redis Cluster node "
            "(REDIS_MODE=cluster or ?cluster=true asks for one)"
        )
    if chosen is RedisMode.CLUSTER:
        return make_cluster(url, timeout_s)
    return make_redis(url, timeout_s)


async def detect_mode(url: str, timeout_s: float, *, log_assumed: bool = False) -> RedisMode:
    """``CLUSTER`` if the server at ``url`` is a cluster node, else ``STANDALONE`` (also when it
    cannot be asked)."""
    found = await server_mode(url, timeout_s)
    if found is RedisMode.AUTO:  # credentials refused: the link and ``check`` say so, with the fix
        return RedisMode.STANDALONE
    if found is None and log_assumed:
        log.warning(
            "redis_mode_assumed",
            mode=RedisMode.STANDALONE.value,
            reason=f"cannot ask {redact_url(url)}",
            hint="set REDIS_MODE=cluster if it is a Redis Cluster",
        )
    return found or RedisMode.STANDALONE


async def server_mode(url: str, timeout_s: float) -> RedisMode | None:
    """What the server at ``url`` says it is; ``None`` if it cannot be reached, ``AUTO`` (it
    cannot tell) if it refuses the credentials."""
    probe = make_redis(url, timeout_s)
    try:
        try:
            info = await probe.info("cluster")
        except NoPermissionError:
            return await _detect_without_info(probe)
        return RedisMode.CLUSTER if int(info.get("cluster_enabled", 0)) else RedisMode.STANDALONE
    except AuthenticationError:
        return RedisMode.AUTO
    except _PROBE_UNAVAILABLE:
        return None
    finally:
        await probe.aclose()


async def _detect_without_info(probe: Redis) -> RedisMode:
    try:
        await probe.execute_command("CLUSTER", "INFO")  # type: ignore[no-untyped-call]
    except ResponseError:  # "cluster support disabled", or refused too: a cluster client needs it
        return RedisMode.STANDALONE
    return RedisMode.CLUSTER


class _Cluster(RedisCluster):
    """``RedisCluster`` whose failure to learn the cluster (no node answers, slots not covered)
    is a ``ConnectionError``, the "Redis unavailable" every caller handles, instead of the
    ``RedisClusterException`` redis-py raises for it and for bugs alike."""

    async def initialize(self) -> RedisCluster:
        try:
            return await super().initialize()
        except RedisClusterException as exc:
            raise RedisConnectionError(str(exc).splitlines()[0]) from exc


def make_cluster(url: str, timeout_s: float) -> RedisCluster:
    """A cluster client started from the node ``url`` names, with short retries: a failover's
    ``MOVED``, ``TRYAGAIN`` or a node that went away is retried within about ``timeout_s``, and
    whatever remains is the caller's "Redis unavailable"."""
    try:
        return _Cluster.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            health_check_interval=0,
            retry=Retry(ExponentialBackoff(cap=timeout_s / 4, base=0.05), retries=3),
            # A MOVED patches the slot table (what a failover needs). Every fifth one would
            # otherwise close all the client's connections under the calls still using them
            # (RuntimeError "handler is closed" on uvloop) to reload the whole table.
            reinitialize_steps=0,
        )
    except (RedisClusterException, TypeError) as exc:
        # ``db`` other than 0, a Unix socket, or a URL parameter only a standalone client knows.
        detail = (
            str(exc).splitlines()[0]
            if isinstance(exc, RedisClusterException)
            else ("a URL parameter that Redis Cluster clients do not take")
        )
        raise ConfigError(f"invalid setting REDIS_URL for a Redis Cluster: {detail}") from None


def make_sentinel_client(url: str, timeout_s: float, sentinel_password: str = "") -> Redis:
    """The master's client of a sentinel URL, with the timeouts and packing of ``make_redis``."""
    client = make_sentinel_redis(url, timeout_s, sentinel_password=sentinel_password)
    pool = client.connection_pool
    pool.connection_class = packed_by_hiredis(pool.connection_class)
    return client


def make_redis(url: str, timeout_s: float) -> Redis:
    """A standalone client for ``url`` with timeouts, so an outage fails calls instead of hanging
    them, and commands packed by hiredis (see ``packed_by_hiredis``)."""
    client = Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry_on_timeout=False,
        health_check_interval=0,
    )
    pool = client.connection_pool
    pool.connection_class = packed_by_hiredis(pool.connection_class)
    return client


def packed_by_hiredis(connection_class: type[AbstractConnection]) -> type[AbstractConnection]:
    """``connection_class`` packing commands with hiredis's C packer.

    redis-py's synchronous client packs with hiredis when it is installed; its asyncio client
    always packs in Python, about 0.8 µs per argument. The worker's scripts carry several
    arguments per message, so that was a tenth of a message's cost. The bytes are the same RESP.
    """

    class HiredisPacking(connection_class):  # type: ignore[valid-type,misc]
        def pack_command(self, *args: EncodableT) -> list[bytes]:
            return pack_with_hiredis(args)

    HiredisPacking.__name__ = HiredisPacking.__qualname__ = (
        f"HiredisPacking{connection_class.__name__}"
    )
    return HiredisPacking


def pack_with_hiredis(args: tuple[EncodableT, ...]) -> list[bytes]:
    """What redis-py's ``HiredisRespSerializer.pack`` does (a multi-word command name is split)."""
    first = args[0]
    if isinstance(first, str):
        args = (*first.encode().split(), *args[1:])
    elif isinstance(first, bytes) and b" " in first:
        args = (*first.split(), *args[1:])
    try:
        return [hiredis.pack_command(args)]  # type: ignore[arg-type]
    except TypeError as exc:
        raise DataError(str(exc)) from exc


async def client_for(settings: Settings) -> RedisClient:
    """``make_client`` for ``REDIS_URL``, ``REDIS_MODE``, ``REDIS_TIMEOUT_S`` and the sentinels'
    ``REDIS_SENTINEL_PASSWORD``."""
    return await make_client(
        settings.redis_url,
        settings.redis_mode,
        settings.redis_timeout_s,
        sentinel_password=settings.redis_sentinel_password.get_secret_value(),
    )
