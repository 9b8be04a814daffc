"""Keeping claims alive while work runs, and stopping work that can no longer be sure of its claim.

Each held lease carries a deadline on the event-loop clock: a safe margin before the claim could
expire in Redis, and never later than the hard ``WORK_TIMEOUT_S`` cap. One background task renews,
in a single batch, every lease whose last renewal is a third of a lease old, and moves the
deadlines forward. The work of a message runs under ``asyncio.timeout_at(deadline)``; if renewal
fails or the lease turns out to be lost, the deadline is not moved and the work is cancelled before
another replica could take the message over. So work outlives a lease only by renewing it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence

import structlog

from worker.claims.protocol import ClaimStore, Lease
from worker.observability.tasks import BackgroundErrors

log = structlog.get_logger("worker.claims.leases")

SAFETY = 0.8  # share of a lease the work may use before a renewal must have succeeded


class HeldLease:
    """One claim being worked on, alone or in a batch that shares one timeout (``group``)."""

    __slots__ = ("group", "hard_deadline", "lease", "lost", "renewed_at", "timeout")

    def __init__(self, lease: Lease, now: float, hard_deadline: float) -> None:
        self.lease = lease
        self.renewed_at = now
        self.hard_deadline = hard_deadline
        self.lost = False
        self.timeout: asyncio.Timeout | None = None
        self.group: list[HeldLease] = [self]

    def deadline(self, lease_s: float) -> float:
        return min(self.renewed_at + lease_s * SAFETY, self.hard_deadline)


class LeaseKeeper:
    """Renews the leases of messages in progress; see the module docstring."""

    def __init__(
        self,
        claims: ClaimStore,
        *,
        lease_s: float,
        work_timeout_s: float,
        errors: BackgroundErrors | None = None,
    ) -> None:
        self._claims = claims
        self._errors = errors or BackgroundErrors()
        self._lease_s = lease_s
        self._work_timeout_s = work_timeout_s
        self._held: dict[Lease, HeldLease] = {}
        self._task: asyncio.Task[None] | None = None

    @contextlib.asynccontextmanager
    async def working(self, message_id: str, token: str) -> AsyncIterator[HeldLease]:
        """Run the body under the lease's deadline; ``TimeoutError`` when it can no longer hold."""
        async with self.working_many([Lease(message_id, token)]) as group:
            yield group[0]

    @contextlib.asynccontextmanager
    async def working_many(self, leases: Sequence[Lease]) -> AsyncIterator[list[HeldLease]]:
        """Run the body under the earliest deadline of ``leases``: the work of a batch stops as
        a whole when any one of its leases can no longer hold."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        group = [HeldLease(lease, now, now + self._work_timeout_s) for lease in leases]
        for held in group:
            held.group = group
            self._held[held.lease] = held
        try:
            async with asyncio.timeout_at(self._deadline(group, now)) as timeout:
                for held in group:
                    held.timeout = timeout
                yield group
        finally:
            for held in group:
                if self._held.get(held.lease) is held:
                    del self._held[held.lease]

    def _deadline(self, group: list[HeldLease], now: float) -> float:
        return min(now if held.lost else held.deadline(self._lease_s) for held in group)

    async def renew_due(self) -> None:
        """Renew, in one batch, the leases last renewed a third of a lease ago or more."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        due = [h for h in self._held.values() if started - h.renewed_at >= self._lease_s / 3]
        if not due:
            return
        results = await self._claims.renew([h.lease for h in due])
        groups: dict[int, list[HeldLease]] = {}
        for held, renewed in zip(due, results, strict=True):
            if renewed:
                held.renewed_at = started
            else:
                held.lost = True
                log.warning("lease_lost", message_id=held.lease.message_id)
            groups[id(held.group)] = held.group
        now = loop.time()
        for group in groups.values():
            timeout = group[0].timeout
            if timeout is not None and not timeout.expired():
                timeout.reschedule(self._deadline(group, now))

    async def _run(self) -> None:
        interval_s = self._lease_s / 6
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.renew_due()
            except Exception as exc:
                # Never the end of renewal: the leases it could not renew run out their
                # deadlines (their work stops in time), and the next turn tries again.
                if self._errors.failed("lease_renewal", exc):
                    log.exception("lease_renewal_failed", retry_in_s=round(interval_s, 2))
            else:
                self._errors.succeeded("lease_renewal")

    async def __aenter__(self) -> LeaseKeeper:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._task is not None:
            task, self._task = self._task, None
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
