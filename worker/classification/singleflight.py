"""Single flight across replicas: of all replicas missing the same cache entry, one computes it.

Each cache entry (its value key) has a short lock, ``{prefix}lock:{classifier}:{text_hash}``. Each
step below is one script call, micro-batched with the same step of the replica's other messages,
so the protocol costs no more round trips than a plain cache read and write:

- **Look up or lock.** The cached value if there is one; otherwise the lock, taken with a token of
  our own and a TTL, if it is free; otherwise "held".
- **Store and release.** The owner computes, then writes the value and deletes its lock in one
  script (owner-checked), so a free lock with no value always means a real miss. When the
  computation fails, the owner turns its lock into a failure mark for ``FAILURE_MARK_S`` instead:
  the failure is shared with the replicas waiting for it, as it is within a replica, so a failing
  classifier is not asked again by every replica in turn (their messages go through the worker's
  retries). A failure mark does not block: the next look-up takes the lock over it.
- **Renew.** While the owner computes, one task per replica renews every lock it holds, in one
  script call every third of the lock's TTL: a live owner keeps its lock however long it takes, and
  a dead owner's lock lapses within the TTL.
- **Wait.** A replica that finds the lock held polls the value and the lock (every 20 ms at first,
  then up to every 100 ms; one ``MGET`` for all its waiters). A value is a hit. A failure mark fails
  the waiter too (``ClassifierUnavailable``). A lock gone with no value (its owner was cancelled or
  died): look up or lock again. When ``SINGLE_FLIGHT_WAIT_S`` runs out, it computes and stores the
  value without the lock, paying twice rather than waiting forever.

Without a reachable Redis every replica simply computes for itself (the in-replica single flight
in ``classify`` still shares one computation between concurrent messages of a replica).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from collections.abc import Awaitable, Callable, Sequence
from enum import Enum
from functools import partial
from typing import Final, NamedTuple, Protocol, TypeVar

import structlog

from worker.claims.store import (  # owner-checked batch renewal, the same script as for claims
    RENEW_LUA,
    in_script_batches,
)
from worker.core.errors import ClassifierUnavailable
from worker.core.gathering import answered, gather_into
from worker.redisio.batching import MicroBatcher
from worker.redisio.link import REDIS_UNAVAILABLE, RedisLink

log = structlog.get_logger("worker.classification.singleflight")

T = TypeVar("T")

LOCK_TTL_S: Final = 5.0
POLL_MIN_S: Final = 0.02
POLL_MAX_S: Final = 0.1
# Long enough for every waiter (polling at most POLL_MAX_S apart) to see that the owner failed.
FAILURE_MARK_S: Final = 0.5
FAILED: Final = b"!failed"

# KEYS: value, lock (per entry). ARGV[1]: lock TTL (ms); ARGV[2]: the failure mark; then a token
# per entry. Per entry: the value if there is one; 1 = lock taken; 0 = lock held by another.
LOOKUP_OR_LOCK_LUA: Final = """
local out = {}
for i = 1, #KEYS / 2 do
  local value = redis.call('GET', KEYS[2 * i - 1])
  if value then
    out[i] = value
  elseif redis.call('SET', KEYS[2 * i], ARGV[i + 2], 'NX', 'PX', ARGV[1]) then
    out[i] = 1
  elseif redis.call('GET', KEYS[2 * i]) == ARGV[2] then  -- a failure mark: take the lock over it
    redis.call('SET', KEYS[2 * i], ARGV[i + 2], 'PX', ARGV[1])
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"""

# KEYS: value, lock (per entry). ARGV per entry: token ('' = none), value ('' = none), TTL (s).
STORE_AND_RELEASE_LUA: Final = """
local out = {}
for i = 1, #KEYS / 2 do
  local token, value = ARGV[3 * i - 2], ARGV[3 * i - 1]
  if value ~= '' then
    redis.call('SET', KEYS[2 * i - 1], value, 'EX', ARGV[3 * i])
  end
  out[i] = 0
  if token ~= '' and redis.call('GET', KEYS[2 * i]) == token then
    redis.call('DEL', KEYS[2 * i])
    out[i] = 1
  end
end
return out
"""

# ARGV[1]: the failure mark's lifetime (ms); ARGV[2]: the mark; ARGV[3]: the owner's token.
MARK_FAILED_LUA: Final = """
if redis.call('GET', KEYS[1]) == ARGV[3] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[1])
  return 1
end
return 0
"""


class Entry(NamedTuple):
    """The Redis keys of one cache entry and of its lock."""

    value_key: str
    lock_key: str


class Store(Protocol[T]):
    """How values are written to and read from their keys."""

    @property
    def ttl_s(self) -> int: ...

    def encode(self, value: T) -> bytes: ...

    def decode(self, raw: bytes) -> T | None: ...


class LockState(Enum):
    FOUND = "found"  # the value is cached: no lock taken
    ACQUIRED = "acquired"
    HELD = "held"  # by another computation (of this or another replica)
    UNAVAILABLE = "unavailable"  # Redis could not be asked


class WaitOutcome(Enum):
    FOUND = "found"
    RELEASED = "released"  # the lock is gone without a value: its owner was cancelled or died
    FAILED = "failed"  # the owner's computation failed
    TIMED_OUT = "timed_out"
    UNAVAILABLE = "unavailable"


class _Write(NamedTuple):
    entry: Entry
    token: str
    value: bytes
    ttl_s: int


class ClusterLocks:
    """Short, renewed, owner-checked locks next to their values; every call is micro-batched."""

    def __init__(self, link: RedisLink, *, ttl_s: float = LOCK_TTL_S) -> None:
        self._link = link
        self._ttl_s = ttl_s
        self._ttl_ms = str(max(1, round(ttl_s * 1000)))
        self._failure_mark_ms = str(round(FAILURE_MARK_S * 1000))
        self._token_prefix = uuid.uuid4().hex[:12]
        self._sequence = itertools.count(1)
        self._held: dict[str, str] = {}
        self._renewer: asyncio.Task[None] | None = None
        client = link.client
        self._lookup_script = client.register_script(LOOKUP_OR_LOCK_LUA)
        self._store_script = client.register_script(STORE_AND_RELEASE_LUA)
        self._renew_script = client.register_script(RENEW_LUA)
        self._mark_failed_script = client.register_script(MARK_FAILED_LUA)
        self._lookups: MicroBatcher[tuple[Entry, str], bytes | int] = MicroBatcher(
            self._lookup_batch
        )
        self._writes: MicroBatcher[_Write, int] = MicroBatcher(self._write_batch)
        self._probes: MicroBatcher[Entry, tuple[bytes | None, bytes | None]] = MicroBatcher(
            self._probe_batch
        )

    async def lookup_or_lock(self, entry: Entry) -> tuple[LockState, str, bytes | None]:
        """``(FOUND, "", value)``, ``(ACQUIRED, token, None)``, ``(HELD | UNAVAILABLE, "", None)``."""
        if not self._link.available:
            return LockState.UNAVAILABLE, "", None
        token = self._new_token()
        try:
            answer = await self._lookups.submit((entry, token))
        except REDIS_UNAVAILABLE as exc:
            self._link.report_failure(exc)
            return LockState.UNAVAILABLE, "", None
        return self._lookup_answer(entry, token, answer)

    async def lookup_or_lock_many(
        self, entries: Sequence[Entry]
    ) -> list[tuple[LockState, str, bytes | None]]:
        """``lookup_or_lock`` for several entries, in one script call per ``MAX_SCRIPT_BATCH``."""
        unavailable: list[tuple[LockState, str, bytes | None]]
        unavailable = [(LockState.UNAVAILABLE, "", None)] * len(entries)
        if not self._link.available:
            return unavailable
        asks = [(entry, self._new_token()) for entry in entries]
        try:
            answers = await in_script_batches(self._lookup_batch, asks)
        except REDIS_UNAVAILABLE as exc:
            self._link.report_failure(exc)  # locks taken by an earlier chunk lapse by themselves
            return unavailable
        return [
            self._lookup_answer(entry, token, answer)
            for (entry, token), answer in zip(asks, answers, strict=True)
        ]

    def _new_token(self) -> str:
        return f"{self._token_prefix}:{next(self._sequence)}"

    def _lookup_answer(
        self, entry: Entry, token: str, answer: bytes | int
    ) -> tuple[LockState, str, bytes | None]:
        if isinstance(answer, bytes):
            return LockState.FOUND, "", answer
        if not answer:
            return LockState.HELD, "", None
        self._held[entry.lock_key] = token
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(self._renew_forever())
        return LockState.ACQUIRED, token, None

    async def store_and_release(
        self, entry: Entry, token: str, value: bytes | None, ttl_s: int
    ) -> None:
        """Write ``value`` (if any) and free our lock (if ``token``); if Redis is down, the lock
        lapses by itself."""
        self._stop_renewing(entry, token)
        if not self._link.available:
            return
        try:
            await self._writes.submit(_Write(entry, token, value or b"", ttl_s))
        except REDIS_UNAVAILABLE as exc:
            self._link.report_failure(exc)

    async def store_many(self, writes: Sequence[tuple[Entry, str, bytes]], ttl_s: int) -> None:
        """``store_and_release`` for several ``(entry, token, value)``, in one script call per
        ``MAX_SCRIPT_BATCH``."""
        for entry, token, _ in writes:
            self._stop_renewing(entry, token)
        if not self._link.available:
            return
        batch = [_Write(entry, token, value, ttl_s) for entry, token, value in writes]
        try:
            await in_script_batches(self._write_batch, batch)
        except REDIS_UNAVAILABLE as exc:
            self._link.report_failure(exc)

    def _stop_renewing(self, entry: Entry, token: str) -> None:
        """Forget our lock on ``entry`` (if ``token`` is still ours): it is released or marked."""
        if token and self._held.get(entry.lock_key) == token:
            del self._held[entry.lock_key]

    async def mark_failed(self, entry: Entry, token: str) -> None:
        """Turn our lock into a short-lived failure mark, so that its waiters fail too."""
        self._stop_renewing(entry, token)
        if not self._link.available:
            return
        try:
            await self._mark_failed_script(
                keys=[entry.lock_key], args=[self._failure_mark_ms, FAILED, token]
            )
        except REDIS_UNAVAILABLE as exc:
            self._link.report_failure(exc)

    async def wait(self, entry: Entry, timeout_s: float) -> tuple[WaitOutcome, bytes | None]:
        """Poll until the value appears, the lock is gone or marked failed, or ``timeout_s``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        delay_s = POLL_MIN_S
        while True:
            remaining_s = deadline - loop.time()
            if remaining_s <= 0:
                return WaitOutcome.TIMED_OUT, None
            await asyncio.sleep(min(delay_s, remaining_s))
            delay_s = min(delay_s * 1.5, POLL_MAX_S)
            if not self._link.available:
                return WaitOutcome.UNAVAILABLE, None
            try:
                value, lock = await self._probes.submit(entry)
            except REDIS_UNAVAILABLE as exc:
                self._link.report_failure(exc)
                return WaitOutcome.UNAVAILABLE, None
            if value is not None:
                return WaitOutcome.FOUND, value
            if lock is None:
                return WaitOutcome.RELEASED, None
            if lock == FAILED:
                return WaitOutcome.FAILED, None

    async def renew_held(self) -> None:
        """Extend every lock this replica holds (one script call); drop those it lost."""
        if not self._held or not self._link.available:
            return
        keys = list(self._held)
        tokens = [self._held[key] for key in keys]
        try:
            renewed = await self._renew_script(keys=keys, args=[self._ttl_ms, *tokens])
        except REDIS_UNAVAILABLE as exc:
            self._link.report_failure(exc)
            return
        for key, token, ok in zip(keys, tokens, renewed, strict=True):
            if not ok and self._held.get(key) == token:
                del self._held[key]
                log.warning("single_flight_lock_lost", note="another replica may compute it too")

    async def _renew_forever(self) -> None:
        while self._held:
            await asyncio.sleep(self._ttl_s / 3)
            await self.renew_held()

    async def _lookup_batch(self, batch: list[tuple[Entry, str]]) -> Sequence[bytes | int]:
        keys = [key for entry, _ in batch for key in (entry.value_key, entry.lock_key)]
        args: list[str | bytes] = [self._ttl_ms, FAILED, *(token for _, token in batch)]
        answers: list[bytes | int] = await self._lookup_script(keys=keys, args=args)
        return answers

    async def _write_batch(self, batch: list[_Write]) -> Sequence[int]:
        keys = [key for w in batch for key in (w.entry.value_key, w.entry.lock_key)]
        args: list[str | bytes | int] = [x for w in batch for x in (w.token, w.value, w.ttl_s)]
        answers: list[int] = await self._store_script(keys=keys, args=args)
        return answers

    async def _probe_batch(self, batch: list[Entry]) -> Sequence[tuple[bytes | None, bytes | None]]:
        keys = [key for entry in batch for key in (entry.value_key, entry.lock_key)]
        values: list[bytes | None] = await self._link.client.mget(keys)
        return list(zip(values[::2], values[1::2], strict=True))

    async def aclose(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
        for batcher in (self._lookups, self._writes, self._probes):
            await batcher.aclose()


class ClusterFlight:
    """Runs the protocol of the module docstring for one entry at a time."""

    def __init__(self, locks: ClusterLocks, *, wait_s: float) -> None:
        self._locks = locks
        self._wait_s = wait_s
        self.waits = 0
        self.wait_timeouts = 0
        self.takeovers = 0
        self.shared_failures = 0

    async def run(
        self, entry: Entry, compute: Callable[[], Awaitable[T]], store: Store[T]
    ) -> tuple[T, bool]:
        """``(value, computed_here)``: the shared value, or ``compute`` it and store it, once for
        all replicas sharing the Redis."""
        deadline = asyncio.get_running_loop().time() + self._wait_s
        while True:
            state, token, raw = await self._locks.lookup_or_lock(entry)
            if state is LockState.FOUND and raw is not None:
                found = store.decode(raw)
                if found is not None:
                    return found, False
                return await self._compute_and_store(entry, compute, store), True  # unreadable
            if state is LockState.UNAVAILABLE:
                return await compute(), True
            if state is LockState.ACQUIRED:
                return await self._own(entry, token, compute, store), True
            self.waits += 1
            remaining_s = deadline - asyncio.get_running_loop().time()
            outcome, raw = await self._locks.wait(entry, remaining_s)
            if outcome is WaitOutcome.FOUND and raw is not None:
                found = store.decode(raw)
                if found is not None:
                    return found, False
                return await self._compute_and_store(entry, compute, store), True
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
            self.takeovers += 1  # the owner went away without a value: try to be the owner

    async def run_many(
        self,
        entries: Sequence[Entry],
        compute_many: Callable[[list[int]], Awaitable[list[T | Exception]]],
        compute: Callable[[int], Awaitable[T]],
        store: Store[T],
    ) -> list[tuple[T, bool] | Exception]:
        """``run`` for several entries at once: one look-up script for all of them; those whose
        lock we took are computed together (``compute_many`` gets their indices) and stored in one
        script. An entry found locked, or unreadable, goes through ``run`` alone (``compute(i)``).
        Each answer is ``(value, computed_here)`` or that entry's exception."""
        out: list[tuple[T, bool] | Exception | None] = [None] * len(entries)
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
            calls = (self.run(entries[i], partial(compute, i), store) for i in alone)
            await gather_into(out, alone, calls)
        return answered(out, len(entries))

    async def _own_many(
        self,
        entries: Sequence[Entry],
        owned: list[tuple[int, str]],
        compute_many: Callable[[list[int]], Awaitable[list[T | Exception]]],
        store: Store[T],
        out: list[tuple[T, bool] | Exception | None],
    ) -> None:
        try:
            values = await compute_many([index for index, _ in owned])
        except BaseException:
            releases = [(entries[i], token, b"") for i, token in owned]
            await asyncio.shield(self._locks.store_many(releases, store.ttl_s))
            raise
        writes: list[tuple[Entry, str, bytes]] = []
        for (index, token), value in zip(owned, values, strict=True):
            if isinstance(value, Exception):
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
        # Lock bookkeeping is shielded: a cancelled owner still frees its waiters at once.
        try:
            value = await compute()
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
        await self._locks.aclose()

    def snapshot(self) -> dict[str, int]:
        return {
            "single_flight_cluster_waits": self.waits,
            "single_flight_wait_timeouts": self.wait_timeouts,
            "single_flight_takeovers": self.takeovers,
            "single_flight_shared_failures": self.shared_failures,
        }
