"""The cluster single flight's locks: short, renewed, owner-checked, next to their values.

Each cache entry (its value key) has a lock key (``RedisKeys.lock``). Every step is one script
call (``scripts/*.lua``, renewal the Redis layer's shared ``renew.lua``), batched with the same
step of the replica's other messages, so the protocol (``singleflight``) costs no more round trips
than a plain cache read and write. While this replica holds locks, one task renews all of them in
one call every third of the TTL: a live owner keeps its lock however long it takes, and a dead
owner's lock lapses within the TTL. If Redis is unreachable, every call says so and the caller
computes for itself; a lock it held lapses by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from collections.abc import Sequence
from enum import Enum
from typing import Final, NamedTuple

import structlog

from worker.redisio.batching import MicroBatcher, in_groups, slot_of
from worker.redisio.clients import is_cluster
from worker.redisio.link import REDIS_ERRORS, RedisLink
from worker.redisio.scripts import RENEW, LuaScript

log = structlog.get_logger("worker.classification.locks")

LOCK_TTL_S: Final = 5.0
POLL_MIN_S: Final = 0.02
POLL_MAX_S: Final = 0.1
# Long enough for every waiter (polling at most POLL_MAX_S apart) to see that the owner failed.
FAILURE_MARK_S: Final = 0.5
FAILED: Final = b"!failed"

LOOKUP_OR_LOCK = LuaScript("worker.classification", "lookup_or_lock.lua")
STORE_AND_RELEASE = LuaScript("worker.classification", "store_and_release.lua")
MARK_FAILED = LuaScript("worker.classification", "mark_failed.lua")


class Entry(NamedTuple):
    """The Redis keys of one cache entry and of its lock."""

    value_key: str
    lock_key: str


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


Looked = tuple[LockState, str, bytes | None]  # (state, our token if ACQUIRED, value if FOUND)
UNAVAILABLE: Final[Looked] = (LockState.UNAVAILABLE, "", None)


class _Write(NamedTuple):
    entry: Entry
    token: str
    value: bytes
    ttl_s: int


def _slot_of_entry(entry: Entry) -> int:
    return slot_of(entry.value_key)


def _slot_of_ask(ask: tuple[Entry, str]) -> int:
    return slot_of(ask[0].value_key)


def _slot_of_held(held: tuple[str, str]) -> int:
    return slot_of(held[0])


def _slot_of_write(write: _Write) -> int:
    return slot_of(write.entry.value_key)


class ClusterLocks:
    """Short, renewed, owner-checked locks next to their values; every call is batched."""

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
        self._lookup_script = LOOKUP_OR_LOCK.register(client)
        self._store_script = STORE_AND_RELEASE.register(client)
        self._renew_script = RENEW.register(client)
        self._mark_failed_script = MARK_FAILED.register(client)
        # Every call keeps its keys in one slot on a cluster (a value and its lock share one).
        self._split = is_cluster(client)
        self._writes: MicroBatcher[_Write, int] = MicroBatcher(self._write_batches)
        self._probes: MicroBatcher[Entry, tuple[bytes | None, bytes | None]] = MicroBatcher(
            self._probe_batches
        )

    async def lookup_or_lock_many(self, entries: Sequence[Entry]) -> list[Looked]:
        """Per entry ``(FOUND, "", value)``, ``(ACQUIRED, token, None)`` or ``(HELD |
        UNAVAILABLE, "", None)``, in one script call per ``MAX_SCRIPT_BATCH``."""
        if not self._link.available:
            return [UNAVAILABLE] * len(entries)
        asks = [(entry, self._new_token()) for entry in entries]
        try:
            answers = await in_groups(self._lookup_batch, asks, _slot_of_ask, split=self._split)
        except REDIS_ERRORS as exc:
            self._link.report_aside(exc)  # locks taken by an earlier chunk lapse by themselves
            return [UNAVAILABLE] * len(entries)
        return [
            self._lookup_answer(entry, token, answer)
            for (entry, token), answer in zip(asks, answers, strict=True)
        ]

    def _new_token(self) -> str:
        return f"{self._token_prefix}:{next(self._sequence)}"

    def _lookup_answer(self, entry: Entry, token: str, answer: bytes | int) -> Looked:
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
        except REDIS_ERRORS as exc:
            self._link.report_aside(exc)

    async def store_many(self, writes: Sequence[tuple[Entry, str, bytes]], ttl_s: int) -> None:
        """``store_and_release`` for several ``(entry, token, value)``, in one script call per
        ``MAX_SCRIPT_BATCH``."""
        for entry, token, _ in writes:
            self._stop_renewing(entry, token)
        if not self._link.available:
            return
        batch = [_Write(entry, token, value, ttl_s) for entry, token, value in writes]
        try:
            await in_groups(self._write_batch, batch, _slot_of_write, split=self._split)
        except REDIS_ERRORS as exc:
            self._link.report_aside(exc)

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
        except REDIS_ERRORS as exc:
            self._link.report_aside(exc)

    async def wait(self, entry: Entry, timeout_s: float) -> tuple[WaitOutcome, bytes | None]:
        """Poll until the value appears, the lock is gone or marked failed, or ``timeout_s``
        (every 20 ms at first, then up to every 100 ms; one ``MGET`` for all waiters)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        delay_s = POLL_MIN_S
        while (remaining_s := deadline - loop.time()) > 0:
            await asyncio.sleep(min(delay_s, remaining_s))
            delay_s = min(delay_s * 1.5, POLL_MAX_S)
            outcome = await self._probe(entry)
            if outcome is not None:
                return outcome
        return WaitOutcome.TIMED_OUT, None

    async def _probe(self, entry: Entry) -> tuple[WaitOutcome, bytes | None] | None:
        """One poll of ``wait``: its outcome, or ``None`` while the lock is still held."""
        if not self._link.available:
            return WaitOutcome.UNAVAILABLE, None
        try:
            value, lock = await self._probes.submit(entry)
        except REDIS_ERRORS as exc:
            self._link.report_aside(exc)
            return WaitOutcome.UNAVAILABLE, None
        if value is not None:
            return WaitOutcome.FOUND, value
        if lock is None:
            return WaitOutcome.RELEASED, None
        if lock == FAILED:
            return WaitOutcome.FAILED, None
        return None

    async def renew_held(self) -> None:
        """Extend every lock this replica holds (one script call); drop those it lost."""
        if not self._held or not self._link.available:
            return
        keys = list(self._held)
        tokens = [self._held[key] for key in keys]
        try:
            renewed = await in_groups(
                self._renew_batch,
                list(zip(keys, tokens, strict=True)),
                _slot_of_held,
                split=self._split,
            )
        except REDIS_ERRORS as exc:
            self._link.report_aside(exc)
            return
        for key, token, ok in zip(keys, tokens, renewed, strict=True):
            if not ok and self._held.get(key) == token:
                del self._held[key]
                log.warning("single_flight_lock_lost", note="another replica may compute it too")

    async def _renew_forever(self) -> None:
        while self._held:
            await asyncio.sleep(self._ttl_s / 3)
            await self.renew_held()

    async def _renew_batch(self, _slot: int, held: list[tuple[str, str]]) -> Sequence[int]:
        keys = [key for key, _ in held]
        args = [self._ttl_ms, *(token for _, token in held)]
        renewed: list[int] = await self._renew_script(keys=keys, args=args)
        return renewed

    async def _lookup_batch(
        self, _slot: int, batch: list[tuple[Entry, str]]
    ) -> Sequence[bytes | int]:
        keys = [key for entry, _ in batch for key in (entry.value_key, entry.lock_key)]
        args: list[str | bytes] = [self._ttl_ms, FAILED, *(token for _, token in batch)]
        answers: list[bytes | int] = await self._lookup_script(keys=keys, args=args)
        return answers

    async def _write_batches(self, batch: list[_Write]) -> Sequence[int]:
        return await in_groups(self._write_batch, batch, _slot_of_write, split=self._split)

    async def _write_batch(self, _slot: int, batch: list[_Write]) -> Sequence[int]:
        keys = [key for w in batch for key in (w.entry.value_key, w.entry.lock_key)]
        args: list[str | bytes | int] = [x for w in batch for x in (w.token, w.value, w.ttl_s)]
        answers: list[int] = await self._store_script(keys=keys, args=args)
        return answers

    async def _probe_batches(
        self, batch: list[Entry]
    ) -> Sequence[tuple[bytes | None, bytes | None]]:
        return await in_groups(self._probe_batch, batch, _slot_of_entry, split=self._split)

    async def _probe_batch(
        self, _slot: int, batch: list[Entry]
    ) -> Sequence[tuple[bytes | None, bytes | None]]:
        keys = [key for entry in batch for key in (entry.value_key, entry.lock_key)]
        values: list[bytes | None] = await self._link.client.mget(keys)
        return list(zip(values[::2], values[1::2], strict=True))

    async def aclose(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
        for batcher in (self._writes, self._probes):
            await batcher.aclose()
