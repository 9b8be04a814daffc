"""Every Redis error has one meaning (unavailable, not writable, refused, or a bug), and the link,
the claims, readiness and the stats endpoint act on it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import fakeredis
import pytest
from aiohttp.test_utils import TestClient, TestServer
from redis.exceptions import (
    AuthenticationError,
    BusyLoadingError,
    ClusterDownError,
    ConnectionError,
    NoPermissionError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
    TimeoutError,
    TryAgainError,
)

from worker.claims.fallback import FallbackClaimStore
from worker.claims.memory_store import MemoryClaimStore
from worker.claims.protocol import ClaimAsk, CompleteStatus, Completion, TokenSource
from worker.claims.redis_store import RedisClaimStore
from worker.core.errors import StoreUnavailable
from worker.observability.counters import Counters, ReplicaIdentity
from worker.observability.http import ReplicaView, build_app
from worker.observability.tasks import BackgroundErrors
from worker.redisio.faults import SENTINEL_FIX, ReplicasBehind, refusal_fix
from worker.redisio.keys import RedisKeys
from worker.redisio.link import RedisFault, RedisLink, classify

KEYS = RedisKeys("errors:")


@pytest.mark.parametrize(
    ("error", "fault"),
    [
        (ConnectionError("reset"), RedisFault.UNAVAILABLE),
        (TimeoutError("slow"), RedisFault.UNAVAILABLE),
        (OSError("unreachable"), RedisFault.UNAVAILABLE),
        (BusyLoadingError("Redis is loading the dataset in memory"), RedisFault.UNAVAILABLE),
        (ReadOnlyError("You can't write against a read only replica."), RedisFault.UNAVAILABLE),
        (ClusterDownError("The cluster is down"), RedisFault.UNAVAILABLE),
        (TryAgainError("Multiple keys request during rehashing of slot"), RedisFault.UNAVAILABLE),
        (ResponseError("MASTERDOWN Link with MASTER is down"), RedisFault.UNAVAILABLE),
        (
            OutOfMemoryError("command not allowed when used memory > 'maxmemory'."),
            RedisFault.NOT_WRITABLE,
        ),
        (ReplicasBehind("WAIT: 0 of 1 replicas in time"), RedisFault.NOT_WRITABLE),
        (
            NoPermissionError("this user has no permissions to run the 'evalsha' command"),
            RedisFault.REFUSED,
        ),
        (AuthenticationError("invalid username-password pair"), RedisFault.REFUSED),
        (
            ResponseError("unknown command 'evalsha', with args beginning with: "),
            RedisFault.REFUSED,
        ),
        (
            ResponseError("The user executing the script can't run this command or subcommand"),
            RedisFault.REFUSED,
        ),
        (ResponseError("ERR user_script:1: Script attempted to access nonexistent global"), None),
    ],
)
def test_each_error_has_one_meaning(error: BaseException, fault: RedisFault | None) -> None:
    """The classification answers the fault of each error, and ``None`` for a bug to raise
    (a wrong password, a ConnectionError subclass, is a refusal, not an outage)."""
    assert classify(error) is fault


def test_a_refusal_says_its_fix() -> None:
    """A NOPERM names the command to grant; a wrong password points at REDIS_URL; an unknown
    EVALSHA points at the sentinel URL form."""
    nope = NoPermissionError("this user has no permissions to run the 'evalsha' command")
    assert "ACL SETUSER <user> +evalsha" in refusal_fix(nope)
    assert "REDIS_URL" in refusal_fix(AuthenticationError("invalid username-password pair"))
    assert SENTINEL_FIX in refusal_fix(ResponseError("unknown command 'evalsha', with args"))


class FullRedis(fakeredis.FakeAsyncRedis):
    """A fake Redis that refuses scripts with ``OOM`` while ``full`` (as under noeviction)."""

    full = False

    async def evalsha(self, *args: Any, **kwargs: Any) -> Any:
        if self.full:
            raise OutOfMemoryError("command not allowed when used memory > 'maxmemory'.")
        return await super().evalsha(*args, **kwargs)


@pytest.fixture
async def full_link() -> AsyncIterator[RedisLink]:
    link = RedisLink(FullRedis(), "redis://fake:6379/0")
    assert await link.connect()
    yield link
    await link.aclose()


def claim_store(link: RedisLink) -> FallbackClaimStore:
    memory = MemoryClaimStore(TokenSource("r/memory"), lease_s=30, dedup_ttl_s=600, max_done=100)
    redis = RedisClaimStore(link.client, KEYS, TokenSource("r"), lease_s=30, dedup_ttl_s=600)
    return FallbackClaimStore(
        redis,
        memory,
        link=link,
        counters=Counters(cluster=True),
        memory_token_prefix="r/memory",
    )


async def test_a_full_redis_holds_claims_and_completions_instead_of_falling_back(
    full_link: RedisLink,
) -> None:
    """Under OOM a claim waits (no memory fallback), the link stays connected with the problem
    named, and a confirmed completion is held and retried until Redis has room, then written."""
    client: Any = full_link.client
    claims = claim_store(full_link)
    claim = (await claims.claim_many([ClaimAsk("m-1")]))[0]
    client.full = True
    with pytest.raises(StoreUnavailable):
        await claims.claim_many([ClaimAsk("m-2")])
    assert full_link.available
    assert full_link.problem is not None
    assert full_link.problem.fault is RedisFault.NOT_WRITABLE

    completing = asyncio.create_task(claims.complete_many([Completion("m-1", claim.token, False)]))
    await asyncio.sleep(0.3)
    assert not completing.done()  # held: the delivery is not acknowledged meanwhile
    client.full = False
    assert await asyncio.wait_for(completing, 5) == [CompleteStatus.IN_REDIS]
    assert full_link.problem is None
    assert await client.exists(KEYS.done("m-1")) == 1


async def test_a_refusal_only_the_stats_meet_does_not_stop_claims(full_link: RedisLink) -> None:
    """``report_aside`` of a NOPERM (say, for INFO) logs it but sets no problem: claims go on."""
    fault = full_link.report_aside(NoPermissionError("no permissions to run the 'info' command"))
    assert fault is RedisFault.REFUSED
    assert full_link.problem is None


async def test_an_unknown_error_is_raised_not_swallowed(full_link: RedisLink) -> None:
    """A script's own error is a bug: the link re-raises it."""
    with pytest.raises(ResponseError):
        full_link.report_failure(ResponseError("ERR user_script:1: bad"))


def test_background_errors_keep_the_current_run_of_failures() -> None:
    """A task's first failure in a row is to be logged, the next ones are counted, a success
    clears it; secrets never appear."""
    errors = BackgroundErrors(secrets=("hunter2",))
    assert errors.failed("heartbeat", ConnectionError("auth hunter2 refused"))
    assert not errors.failed("heartbeat", ConnectionError("auth hunter2 refused"))
    (entry,) = errors.snapshot().values()
    assert entry["failures"] == 2
    assert "hunter2" not in str(entry)
    errors.succeeded("heartbeat")
    assert errors.snapshot() == {}


class CrossSlotRedis(fakeredis.FakeAsyncRedis):
    """A fake Redis whose reads fail with an error nobody classified."""

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        if args[0] in ("HGETALL", "MGET", "SMEMBERS", "INFO"):
            raise ResponseError("CROSSSLOT Keys in request don't hash to the same slot")
        return await super().execute_command(*args, **options)


async def test_the_stats_endpoint_answers_json_with_the_error_and_readiness_the_problem() -> None:
    """A Redis error while reading the cluster view gives this replica's view with the error
    (HTTP 200 JSON, not a 500); a link problem makes readiness 503 naming it."""
    link = RedisLink(CrossSlotRedis(), "redis://fake:6379/0")
    assert await link.connect()
    view = ReplicaView(
        identity=ReplicaIdentity.create("unit-replica"),
        counters=Counters(cluster=True),
        link=link,
        keys=KEYS,
        in_flight=lambda: 0,
        broker_connected=lambda: True,
        consuming=lambda: True,
    )
    async with TestClient(TestServer(build_app(view))) as http:
        response = await http.get("/api/monitoring/stats")
        assert response.status == 200
        stats = await response.json()
        assert stats["scope"] == "instance"
        assert "CROSSSLOT" in stats["error"]
        assert stats["replica"]["background_errors"] == {}
        assert (await http.get("/health/ready")).status == 200
        link.report_failure(OutOfMemoryError("command not allowed when used memory > 'maxmemory'."))
        response = await http.get("/health/ready")
        assert response.status == 503
        assert "OOM" in (await response.json())["reason"]
    await link.aclose()
