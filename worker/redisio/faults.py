"""What an error of a Redis call means for the worker: one classification, used by the link.

``classify`` answers a ``RedisFault`` (see ``worker.redisio.link`` for what each one does) or
``None`` for an error that is not Redis's answer to the situation but a bug (a script error, bad
arguments): that one is raised. ``refusal_fix`` is the one-line fix logged with a refusal.
"""

from __future__ import annotations

import asyncio
from enum import StrEnum

import structlog
from redis.asyncio import Redis, RedisCluster
from redis.exceptions import (
    AuthenticationError,
    AuthenticationWrongNumberOfArgsError,
    AuthorizationError,
    BusyLoadingError,
    ClusterDownError,
    ClusterError,
    NoPermissionError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

# Failures that mean "Redis is not reachable right now" (not a bug in a command or a script).
# The cluster's: a slot without a master (CLUSTERDOWN), a slot being moved (TRYAGAIN), and the
# client's own "gave up following redirections or reaching the slot's node".
REDIS_UNAVAILABLE: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    OSError,
    asyncio.TimeoutError,
    ClusterDownError,
    TryAgainError,
    SlotNotCoveredError,
    ClusterError,
)
# Everything a Redis call may raise: catch this at the I/O boundary, then ``report_failure``.
REDIS_ERRORS: tuple[type[BaseException], ...] = (
    RedisError,
    RedisClusterException,
    OSError,
    asyncio.TimeoutError,
)

SENTINEL_FIX = (
    "REDIS_URL points at a sentinel: use redis+sentinel://host:26379[,host2:26379]/MASTER_NAME/0"
)


# Messages of ResponseError that say a connection is not served by a writable master right now.
# How a script reports a command or key the user's ACL refuses (a plain ResponseError).
_SCRIPT_REFUSALS = (
    "The user executing the script can't run this command",
    "The user executing the script can't access",
    "NOPERM",
)
_TRANSIENT_REPLIES = ("MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN", "LOADING", "READONLY")


class RedisFault(StrEnum):
    """What an error of a Redis call means for the worker (see the module docstring)."""

    UNAVAILABLE = "unavailable"
    NOT_WRITABLE = "not_writable"
    REFUSED = "refused"


class ReplicasBehind(RedisError):
    """Fewer Redis replicas than ``REDIS_WAIT_REPLICAS`` acknowledged a completion in time: its
    done markers may not survive a failover, so it is held and retried, not acknowledged."""


def classify(exc: BaseException) -> RedisFault | None:
    """The ``RedisFault`` of ``exc``, or ``None`` when it is not one (a bug: let it raise)."""
    if isinstance(exc, AuthenticationError | AuthorizationError | NoPermissionError):
        return RedisFault.REFUSED
    if isinstance(exc, AuthenticationWrongNumberOfArgsError):
        return RedisFault.REFUSED
    if isinstance(exc, OutOfMemoryError | ReplicasBehind):
        return RedisFault.NOT_WRITABLE
    if isinstance(exc, ReadOnlyError | ClusterDownError | TryAgainError | BusyLoadingError):
        return RedisFault.UNAVAILABLE
    if isinstance(exc, REDIS_UNAVAILABLE):
        return RedisFault.UNAVAILABLE
    if isinstance(exc, ResponseError):
        text = str(exc)
        if text.lower().startswith("unknown command") or text.startswith(_SCRIPT_REFUSALS):
            return RedisFault.REFUSED
        if text.startswith(_TRANSIENT_REPLIES):
            return RedisFault.UNAVAILABLE
    return None


def refusal_fix(exc: BaseException) -> str:
    """What the operator should change, for a ``REFUSED`` error."""
    text = str(exc)
    if isinstance(exc, AuthenticationError | AuthenticationWrongNumberOfArgsError):
        return "check the user and password in REDIS_URL"
    if isinstance(exc, NoPermissionError):
        command = text.split("'")[1] if text.count("'") >= 2 else "the command"
        return (
            f"the Redis user may not run {command!r}: grant it, e.g. ACL SETUSER <user> "
            f"+{command.lower()} (deploy/README.md, 'Least privilege', has the whole line)"
        )
    if text.startswith(_SCRIPT_REFUSALS):
        return (
            "the Redis user may not run a command (or touch a key) of the worker's scripts: "
            "use the ACL SETUSER line of deploy/README.md, 'Least privilege'"
        )
    if "evalsha" in text.lower() or "eval" in text.lower():
        return SENTINEL_FIX + "; or the server offers no scripting (EVALSHA)"
    return "the server does not offer a command the worker needs"


NOT_WRITABLE_LINE = "⚠️ Redis refuses writes"


async def warn_not_writable(
    client: Redis | RedisCluster, where: str, error: str, fallback: str
) -> None:
    """The link's warning for a full Redis, with the memory figures when ``INFO`` is permitted."""
    memory: dict[str, object] = {}
    try:
        info = await client.info("memory")
        memory = {
            "used_memory": info.get("used_memory"),
            "maxmemory": info.get("maxmemory"),
            "maxmemory_policy": info.get("maxmemory_policy"),
        }
    except REDIS_ERRORS:
        memory = {"maxmemory": "unknown (INFO not permitted or failed)"}
    structlog.get_logger("worker.redis").warning(
        NOT_WRITABLE_LINE,
        redis=where,
        error=error,
        **memory,
        fix="free memory in Redis, raise maxmemory, or shorten DEDUP_TTL_S/CACHE_TTL_S",
        fallback=fallback,
        retry="claims are retried with backoff (at most 0.5 s apart)",
    )
