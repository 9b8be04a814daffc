"""Work runs under a deadline that renewal moves forward and a lost lease pulls in."""

from __future__ import annotations

import asyncio

import pytest

from worker.dedup import Lease, MemoryClaimStore, TokenSource
from worker.leases import LeaseKeeper


class ScriptedClaims(MemoryClaimStore):
    """The in-memory store, with a switch that makes every renewal answer "lost"."""

    def __init__(self) -> None:
        super().__init__(TokenSource("t"), lease_s=0.3, dedup_ttl_s=60, max_done=100)
        self.lose = False

    async def renew(self, leases: list[Lease]) -> list[bool]:  # type: ignore[override]
        if self.lose:
            return [False] * len(leases)
        return await super().renew(leases)


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
