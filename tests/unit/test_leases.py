"""Work runs under a deadline that renewal moves forward and a lost lease pulls in."""

from __future__ import annotations

import asyncio

import pytest

from worker.claims.leases import LeaseKeeper
from worker.claims.store import Lease, MemoryClaimStore, TokenSource


class ScriptedClaims(MemoryClaimStore):
    """The in-memory store, with a switch that makes every renewal answer "lost"."""

    def __init__(self) -> None:
        super().__init__(TokenSource("t"), lease_s=0.3, dedup_ttl_s=60, max_done=100)
        self.lose = False
        self.lose_only: set[str] = set()

    async def renew(self, leases: list[Lease]) -> list[bool]:  # type: ignore[override]
        if self.lose:
            return [False] * len(leases)
        renewed = await super().renew(leases)
        return [
            ok and lease.message_id not in self.lose_only
            for lease, ok in zip(leases, renewed, strict=True)
        ]


async def test_work_longer_than_the_lease_survives_by_renewal() -> None:
    """Work lasting three leases finishes, because the keeper keeps renewing its claim."""
    claims = ScriptedClaims()
    claim = await claims.claim("m", False)
    async with LeaseKeeper(claims, lease_s=0.3, work_timeout_s=10) as keeper:
        async with keeper.working("m", claim.token):
            await asyncio.sleep(0.9)
    assert await claims.release("m", claim.token)


async def test_lost_lease_stops_the_work() -> None:
    """When renewal says the lease is lost, the work is cancelled with ``TimeoutError``."""
    claims = ScriptedClaims()
    claim = await claims.claim("m", False)
    claims.lose = True
    async with LeaseKeeper(claims, lease_s=0.3, work_timeout_s=10) as keeper:
        with pytest.raises(TimeoutError):
            async with keeper.working("m", claim.token) as held:
                await asyncio.sleep(2)
        assert held.lost


async def test_hard_timeout_caps_work_even_while_renewals_succeed() -> None:
    """``WORK_TIMEOUT_S`` ends work that keeps renewing its lease forever."""
    claims = ScriptedClaims()
    claim = await claims.claim("m", False)
    loop = asyncio.get_running_loop()
    async with LeaseKeeper(claims, lease_s=0.3, work_timeout_s=0.5) as keeper:
        started = loop.time()
        with pytest.raises(TimeoutError):
            async with keeper.working("m", claim.token):
                await asyncio.sleep(5)
        assert 0.4 < loop.time() - started < 1.0


async def test_a_batch_renews_all_its_leases_and_outlives_them() -> None:
    """A batch of messages worked on together keeps every one of its claims alive."""
    claims = ScriptedClaims()
    tokens = {m: (await claims.claim(m, False)).token for m in ("a", "b", "c")}
    async with LeaseKeeper(claims, lease_s=0.3, work_timeout_s=10) as keeper:
        async with keeper.working_many([Lease(m, t) for m, t in tokens.items()]):
            await asyncio.sleep(0.9)
    for message_id, token in tokens.items():
        assert await claims.release(message_id, token), message_id


async def test_one_lost_lease_stops_its_whole_batch() -> None:
    """The work of a batch shares one deadline: when any of its leases is lost, all of it stops
    (the batch's messages are then released and retried), and the leases it held are forgotten."""
    claims = ScriptedClaims()
    tokens = {m: (await claims.claim(m, False)).token for m in ("a", "b", "c")}
    claims.lose_only = {"b"}
    loop = asyncio.get_running_loop()
    async with LeaseKeeper(claims, lease_s=0.3, work_timeout_s=10) as keeper:
        started = loop.time()
        with pytest.raises(TimeoutError):
            async with keeper.working_many([Lease(m, t) for m, t in tokens.items()]) as group:
                await asyncio.sleep(5)
        assert loop.time() - started < 0.5
        assert [h.lost for h in group] == [False, True, False]
        assert keeper._held == {}
