"""Work runs under a deadline that renewal moves forward and a lost lease pulls in."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from tests.unit.test_dedup import claim_one
from worker.claims.leases import LeaseKeeper
from worker.claims.memory_store import MemoryClaimStore
from worker.claims.protocol import Lease, TokenSource

LEASE_S = 0.3


class ScriptedClaims(MemoryClaimStore):
    """The in-memory store, recording each renewal call (and signalling it), with switches that
    make renewals answer "lost"."""

    def __init__(self) -> None:
        super().__init__(TokenSource("t"), lease_s=LEASE_S, dedup_ttl_s=60, max_done=100)
        self.lose = False
        self.lose_only: set[str] = set()
        self.renewed: list[list[str]] = []  # the message IDs of each renewal call
        self._renewal = asyncio.Event()

    async def renew(self, leases: Sequence[Lease]) -> list[bool]:
        self.renewed.append([lease.message_id for lease in leases])
        self._renewal.set()
        if self.lose:
            return [False] * len(leases)
        renewed = await super().renew(leases)
        return [
            ok and lease.message_id not in self.lose_only
            for lease, ok in zip(leases, renewed, strict=True)
        ]

    async def renewals(self, count: int) -> None:
        """Return once ``count`` renewal calls were made in all."""
        async with asyncio.timeout(5):
            while len(self.renewed) < count:
                self._renewal.clear()
                await self._renewal.wait()

    async def claim_tokens(self, *message_ids: str) -> dict[str, str]:
        return {m: (await claim_one(self, m)).token for m in message_ids}


async def forever() -> None:
    """Work that only a cancellation ends."""
    await asyncio.Event().wait()


async def test_work_longer_than_the_lease_survives_by_renewal() -> None:
    """Work lasting three renewals (more than a lease) finishes, and still holds its claim,
    because the keeper keeps renewing it."""
    claims = ScriptedClaims()
    token = (await claims.claim_tokens("m"))["m"]
    loop = asyncio.get_running_loop()
    async with LeaseKeeper(claims, lease_s=LEASE_S, work_timeout_s=10) as keeper:
        started = loop.time()
        async with keeper.working("m", token):
            await claims.renewals(3)
        assert loop.time() - started >= LEASE_S
    assert await claims.release("m", token)


@pytest.mark.timeout(10)
async def test_lost_lease_stops_the_work() -> None:
    """When renewal says the lease is lost, the work is cancelled with ``TimeoutError``."""
    claims = ScriptedClaims()
    token = (await claims.claim_tokens("m"))["m"]
    claims.lose = True
    async with LeaseKeeper(claims, lease_s=LEASE_S, work_timeout_s=10) as keeper:
        with pytest.raises(TimeoutError):
            async with keeper.working("m", token) as held:
                await forever()
        assert held.lost
        assert claims.renewed == [["m"]]


@pytest.mark.timeout(10)
async def test_hard_timeout_caps_work_even_while_renewals_succeed() -> None:
    """``WORK_TIMEOUT_S`` ends work that keeps renewing its lease forever."""
    claims = ScriptedClaims()
    token = (await claims.claim_tokens("m"))["m"]
    loop = asyncio.get_running_loop()
    async with LeaseKeeper(claims, lease_s=LEASE_S, work_timeout_s=0.5) as keeper:
        started = loop.time()
        with pytest.raises(TimeoutError):
            async with keeper.working("m", token) as held:
                await forever()
        assert 0.4 < loop.time() - started < 1.0
    assert claims.renewed
    assert not held.lost


async def test_a_batch_renews_all_its_leases_and_outlives_them() -> None:
    """A batch of messages worked on together keeps every one of its claims alive, renewing them
    in one call."""
    claims = ScriptedClaims()
    tokens = await claims.claim_tokens("a", "b", "c")
    async with LeaseKeeper(claims, lease_s=LEASE_S, work_timeout_s=10) as keeper:
        async with keeper.working_many([Lease(m, t) for m, t in tokens.items()]):
            await claims.renewals(3)
    assert claims.renewed[:3] == [["a", "b", "c"]] * 3
    for message_id, token in tokens.items():
        assert await claims.release(message_id, token), message_id


@pytest.mark.timeout(10)
async def test_one_lost_lease_stops_its_whole_batch() -> None:
    """The work of a batch shares one deadline: when any of its leases is lost, all of it stops
    (the batch's messages are then released and retried), and the keeper renews none of its
    leases afterwards."""
    claims = ScriptedClaims()
    tokens = await claims.claim_tokens("a", "b", "c", "later")
    claims.lose_only = {"b"}
    loop = asyncio.get_running_loop()
    async with LeaseKeeper(claims, lease_s=LEASE_S, work_timeout_s=10) as keeper:
        started = loop.time()
        batch = [Lease(m, tokens[m]) for m in "abc"]
        with pytest.raises(TimeoutError):
            async with keeper.working_many(batch) as group:
                await forever()
        assert loop.time() - started < 0.5
        assert [h.lost for h in group] == [False, True, False]
        calls = len(claims.renewed)
        async with keeper.working("later", tokens["later"]):
            await claims.renewals(calls + 1)
        assert claims.renewed[calls:] == [["later"]]
