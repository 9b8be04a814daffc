"""Claiming through the store, the same way for a pass, a busy wait and a suspect.

While the store must wait for Redis (strict mode, or the first seconds of an outage) the claim
is held and asked again with backoff, the deliveries stay unacknowledged, and the consumer
reports itself ``paused``. Anything else that goes wrong is logged and the deliveries are
requeued after ``REQUEUE_PAUSE_S``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import structlog

from worker.claims.protocol import ClaimAsk, ClaimResult, ClaimStore
from worker.core.errors import StoreUnavailable
from worker.processing.failures import REQUEUE_PAUSE_S
from worker.processing.stopping import Stopping

log = structlog.get_logger("worker.processing.claiming")

STORE_POLL_MIN_S = 0.05
STORE_POLL_MAX_S = 0.5


def _never() -> bool:
    return False


class Claimer:
    """Claims IDs in one round trip per call, holding them while Redis is away."""

    def __init__(self, store: ClaimStore, stopping: Stopping) -> None:
        self._store = store
        self._stopping = stopping
        self._holding = 0

    @property
    def paused(self) -> bool:
        """True while claims wait for the claim store (Redis)."""
        return self._holding > 0

    async def claim(
        self, asks: Sequence[ClaimAsk], *, given_up: Callable[[], bool] = _never
    ) -> list[ClaimResult] | None:
        """The store's answers for ``asks``; ``None`` when they should be requeued: the replica
        is stopping, ``given_up()`` became true while the store waited, or the store failed in
        a way nobody expected."""
        delay_s = STORE_POLL_MIN_S
        holding = False
        try:
            while True:
                try:
                    answers: list[ClaimResult] = await self._store.claim_many(asks)
                    return answers
                except StoreUnavailable:
                    if not holding:
                        holding = True
                        self._hold(+1)
                except Exception:
                    log.exception("claim_failed")
                    await self._stopping.pause(REQUEUE_PAUSE_S)
                    return None
                if await self._stopping.pause(delay_s) or given_up():
                    return None
                delay_s = min(delay_s * 2, STORE_POLL_MAX_S)
        finally:
            if holding:
                self._hold(-1)

    def _hold(self, change: int) -> None:
        was_paused = self.paused
        self._holding += change
        if self.paused and not was_paused:
            log.warning("consumer_paused", reason="claims are waiting for Redis")
        elif was_paused and not self.paused:
            log.info("consumer_resumed")
