"""Single flight across replicas: of all replicas missing the same cache entry, one computes it.

The protocol, over the locks of ``locks`` (each step one batched script call):

- **Look up or lock.** The cached value if there is one; otherwise the lock, taken with a token of
  our own and a TTL, if it is free; otherwise "held".
- **Store and release.** The owner computes, then writes the value and deletes its lock in one
  script (owner-checked), so a free lock with no value always means a real miss. When the
  computation fails, the owner turns its lock into a failure mark for ``FAILURE_MARK_S`` instead:
  the failure is shared with the replicas waiting for it, as it is within a replica, so a failing
  classifier is not asked again by every replica in turn (their messages go through the worker's
  retries). A failure mark does not block: the next look-up takes the lock over it.
- **Renew.** While the owner computes, its replica renews every lock it holds.
- **Wait.** A replica that finds the lock held polls the value and the lock. A value is a hit. A
  failure mark fails the waiter too (``ClassifierUnavailable``). A lock gone with no value (its
  owner was cancelled or died): look up or lock again. When ``SINGLE_FLIGHT_WAIT_S`` runs out, it
  computes and stores the value without the lock, paying twice rather than waiting forever.

Without a reachable Redis every replica simply computes for itself (the in-replica single flight
of ``CachedClassifier`` still shares one computation between concurrent messages of a replica).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Protocol, TypeVar

import structlog

from worker.classification.locks import ClusterLocks, Entry, LockState, Looked, WaitOutcome
from worker.core.errors import ClassifierPaused, ClassifierUnavailable
from worker.core.gathering import answered, gather_into
from worker.redisio.batching import MicroBatcher

log = structlog.get_logger("worker.classification.singleflight")

T = TypeVar("T")

Flown = tuple[T, bool]  # (value, computed_here)


class Store(Protocol[T]):
    """How values are written to and read from their keys."""

    @property
    def ttl_s(self) -> int: ...

    def encode(self, value: T) -> bytes: ...

    def decode(self, raw: bytes) -> T | None: ...


class ClusterFlight:
    """Runs the protocol of the module docstring for a batch of entries."""

    def __init__(self, locks: ClusterLocks, *, wait_s: float) -> None:
        self._locks = locks
        self._wait_s = wait_s
        # Entries settled alone look up again one by one: those of one loop turn share a call.
        self._lookups: MicroBatcher[Entry, Looked] = MicroBatcher(locks.lookup_or_lock_many)
        self.waits = 0
        self.wait_timeouts = 0
        self.takeovers = 0
        self.shared_failures = 0

    async def run_many(
        self,
        entries: Sequence[Entry],
        compute_many: Callable[[list[int]], Awaitable[list[T | Exception]]],
        compute: Callable[[int], Awaitable[T]],
        store: Store[T],
    ) -> list[Flown[T] | Exception]:
        """The protocol for several entries at once: one look-up script for all of them; those
        whose lock we took are computed together (``compute_many`` gets their indices) and stored
        in one script. An entry found locked, or unreadable, is settled alone (``compute(i)``),
        waiting for its owner. Each answer is ``(value, computed_here)`` or that entry's
        exception."""
        out: list[Flown[T] | Exception | None] = [None] * len(entries)
        owned: list[tuple[int, str]] = []
        alone: list[int] = []
        answers = await self._locks.lookup_or_lock_many(entries)
        for index, (state, token, raw) in enumerate(answers):
            found = store.decode(raw) if state is LockState.FOUND and raw is not None else None
            if found is not None:
                out[index] = (found, False)
            elif state is LockState.ACQUIRED:
                owned.append((index, token))
            else:
                alone.append(index)
        if owned:
            await self._own_many(entries, owned, compute_many, store, out)
        if alone:
            calls = (self._settle(entries[i], partial(compute, i), store) for i in alone)
            await gather_into(out, alone, calls)
        return answered(out, len(entries))

    async def _settle(
        self, entry: Entry, compute: Callable[[], Awaitable[T]], store: Store[T]
    ) -> Flown[T]:
        """One entry through the protocol: look up or lock, then own, or wait and try again."""
        deadline = asyncio.get_running_loop().time() + self._wait_s
        while True:
            state, token, raw = await self._lookups.submit(entry)
            if state is LockState.FOUND and raw is not None:
                return await self._read(entry, raw, compute, store)
            if state is LockState.UNAVAILABLE:
                return await compute(), True
            if state is LockState.ACQUIRED:
                return await self._own(entry, token, compute, store), True
            waited = await self._wait(entry, deadline, compute, store)
            if waited is not None:
                return waited
            self.takeovers += 1  # the owner went away without a value: try to be the owner

    async def _wait(
        self,
        entry: Entry,
        deadline: float,
        compute: Callable[[], Awaitable[T]],
        store: Store[T],
    ) -> Flown[T] | None:
        """Wait for the owner of ``entry``; ``None`` when it went away without a value."""
        self.waits += 1
        remaining_s = deadline - asyncio.get_running_loop().time()
        outcome, raw = await self._locks.wait(entry, remaining_s)
        if outcome is WaitOutcome.FOUND and raw is not None:
            return await self._read(entry, raw, compute, store)
        if outcome is WaitOutcome.FAILED:
            self.shared_failures += 1
            raise ClassifierUnavailable(
                "the classification of this text failed on another replica just now"
            )
        if outcome is WaitOutcome.UNAVAILABLE:
            return await compute(), True
        if outcome is WaitOutcome.TIMED_OUT:
            self.wait_timeouts += 1
            log.warning("single_flight_wait_timed_out", wait_s=self._wait_s)
            return await self._compute_and_store(entry, compute, store), True
        return None

    async def _read(
        self, entry: Entry, raw: bytes, compute: Callable[[], Awaitable[T]], store: Store[T]
    ) -> Flown[T]:
        """The value found in Redis; if it cannot be read, computed and stored over it."""
        found = store.decode(raw)
        if found is not None:
            return found, False
        return await self._compute_and_store(entry, compute, store), True

    async def _own_many(
        self,
        entries: Sequence[Entry],
        owned: list[tuple[int, str]],
        compute_many: Callable[[list[int]], Awaitable[list[T | Exception]]],
        store: Store[T],
        out: list[Flown[T] | Exception | None],
    ) -> None:
        # Lock bookkeeping is shielded: a cancelled owner still frees its waiters at once.
        try:
            values = await compute_many([index for index, _ in owned])
        except BaseException:
            releases = [(entries[i], token, b"") for i, token in owned]
            await asyncio.shield(self._locks.store_many(releases, store.ttl_s))
            raise
        writes: list[tuple[Entry, str, bytes]] = []
        for (index, token), value in zip(owned, values, strict=True):
            if isinstance(value, ClassifierPaused):  # not a failure to share: nobody was asked
                release = [(entries[index], token, b"")]
                await asyncio.shield(self._locks.store_many(release, store.ttl_s))
                out[index] = value
            elif isinstance(value, Exception):
                await asyncio.shield(self._locks.mark_failed(entries[index], token))
                out[index] = value
            else:
                writes.append((entries[index], token, store.encode(value)))
                out[index] = (value, True)
        if writes:
            await asyncio.shield(self._locks.store_many(writes, store.ttl_s))

    async def _own(
        self, entry: Entry, token: str, compute: Callable[[], Awaitable[T]], store: Store[T]
    ) -> T:
        try:
            value = await compute()
        except ClassifierPaused:
            await asyncio.shield(self._locks.store_and_release(entry, token, None, store.ttl_s))
            raise
        except Exception:
            await asyncio.shield(self._locks.mark_failed(entry, token))
            raise
        except BaseException:
            await asyncio.shield(self._locks.store_and_release(entry, token, None, store.ttl_s))
            raise
        encoded = store.encode(value)
        await asyncio.shield(self._locks.store_and_release(entry, token, encoded, store.ttl_s))
        return value

    async def _compute_and_store(
        self, entry: Entry, compute: Callable[[], Awaitable[T]], store: Store[T]
    ) -> T:
        value = await compute()
        await self._locks.store_and_release(entry, "", store.encode(value), store.ttl_s)
        return value

    async def aclose(self) -> None:
        await self._lookups.aclose()
        await self._locks.aclose()

    def snapshot(self) -> dict[str, int]:
        return {
            "single_flight_cluster_waits": self.waits,
            "single_flight_wait_timeouts": self.wait_timeouts,
            "single_flight_takeovers": self.takeovers,
            "single_flight_shared_failures": self.shared_failures,
        }
