"""Claims inside one process (no Redis): the protocol of ``protocol``, exact for one replica and
blind to the others."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING

from worker.claims.protocol import ClaimResult, ClaimStatus, CompleteStatus

if TYPE_CHECKING:
    from worker.claims.protocol import ClaimAsk, Completion, Lease, TokenSource


class MemoryClaimStore:
    """Claims inside one process: exact for one replica, blind to the others (no Redis).

    Attempts are counted as in Redis, but they die with the process: without Redis a message that
    kills its replica is redelivered to the next one with a count of zero.
    """

    def __init__(
        self,
        tokens: TokenSource,
        *,
        lease_s: float,
        dedup_ttl_s: int,
        max_done: int,
        max_attempts: int = 0,
    ) -> None:
        self.lease_s = lease_s
        self._tokens = tokens
        self._dedup_ttl_s = dedup_ttl_s
        self._max_done = max_done
        self._max_attempts = max_attempts
        self._claims: dict[str, tuple[str, float]] = {}
        self._done: OrderedDict[str, float] = OrderedDict()
        self._attempts: OrderedDict[str, tuple[int, float]] = OrderedDict()

    def is_done(self, message_id: str) -> bool:
        expires = self._done.get(message_id)
        return expires is not None and expires > time.monotonic()

    def mark_done(self, message_id: str) -> None:
        """Remember a finished ID (oldest forgotten first once ``max_done`` is reached)."""
        now = time.monotonic()
        self._done[message_id] = now + self._dedup_ttl_s
        self._done.move_to_end(message_id)
        self._claims.pop(message_id, None)
        self._attempts.pop(message_id, None)
        while self._done:
            oldest, expires = next(iter(self._done.items()))
            if expires > now and len(self._done) <= self._max_done:
                break
            del self._done[oldest]

    async def claim_many(self, requests: Sequence[ClaimAsk]) -> list[ClaimResult]:
        return [self._claim(ask) for ask in requests]

    def _claim(self, ask: ClaimAsk) -> ClaimResult:
        message_id = ask.message_id
        if self.is_done(message_id):
            return ClaimResult(ClaimStatus.DONE)
        now = time.monotonic()
        held = self._claims.get(message_id)
        if held is not None and held[1] > now:
            return ClaimResult(ClaimStatus.BUSY, retry_after_s=held[1] - now)
        started = self._started(message_id, now)
        if 0 < self._max_attempts <= started:
            return ClaimResult(ClaimStatus.EXHAUSTED, attempt=started)
        if 0 < ask.suspect_at <= started:
            return ClaimResult(ClaimStatus.SUSPECT, attempt=started)
        self._count_attempt(message_id, started, now)
        token = self._tokens.next()
        self._claims[message_id] = (token, now + self.lease_s)
        return ClaimResult(ClaimStatus.CLAIMED, token, attempt=started + 1)

    def _started(self, message_id: str, now: float) -> int:
        attempts, expires = self._attempts.get(message_id, (0, 0.0))
        return attempts if expires > now else 0

    def _count_attempt(self, message_id: str, started: int, now: float) -> None:
        _, expires = self._attempts.get(message_id, (0, 0.0))
        if started == 0:
            expires = now + self._dedup_ttl_s
        self._attempts[message_id] = (started + 1, expires)
        self._attempts.move_to_end(message_id)
        while len(self._attempts) > self._max_done:
            self._attempts.popitem(last=False)

    def _owns(self, message_id: str, token: str) -> bool:
        held = self._claims.get(message_id)
        return held is not None and held[0] == token and held[1] > time.monotonic()

    async def complete_many(self, items: Sequence[Completion]) -> list[CompleteStatus]:
        return [self._complete(item) for item in items]

    def _complete(self, item: Completion) -> CompleteStatus:
        # As complete.lua: a lease that lapsed with nobody else claiming still completes (the
        # result is published, so the ID is done); another owner's live lease, or done, does not.
        held = self._claims.get(item.message_id)
        unheld = held is None or held[1] <= time.monotonic()
        if not (
            self._owns(item.message_id, item.token) or (unheld and not self.is_done(item.message_id))
        ):
            return CompleteStatus.LOST
        self.mark_done(item.message_id)
        return CompleteStatus.IN_MEMORY

    async def release(self, message_id: str, token: str, *, refund_attempt: bool = False) -> bool:
        if not self._owns(message_id, token):
            return False
        del self._claims[message_id]
        if refund_attempt and (counted := self._attempts.get(message_id)) is not None:
            self._attempts[message_id] = (max(0, counted[0] - 1), counted[1])
        return True

    async def renew(self, leases: Sequence[Lease]) -> list[bool]:
        renewed = []
        for lease in leases:
            owned = self._owns(lease.message_id, lease.token)
            if owned:
                self._claims[lease.message_id] = (lease.token, time.monotonic() + self.lease_s)
            renewed.append(owned)
        return renewed

    async def aclose(self) -> None:
        self._claims.clear()
