"""Micro-batching: requests made by many concurrent messages become one round trip.

Each message awaits ``submit(request)`` as if it were a single call. Requests submitted in the same
event-loop turn, and those that arrive while a batch is in flight, are handed to ``run_batch``
together. Under load batches grow by themselves; a lone message waits only for the next loop turn.

``in_script_batches`` is the other half: a batch a caller already holds, cut into script calls of
at most ``MAX_SCRIPT_BATCH`` items. ``in_groups`` cuts a batch by hash slot first, for a Redis
Cluster (every key of one call must be in one slot): one call per group, all groups at once, so a
batch still costs about one round trip per node; on a single Redis it is one call as before.
"""

from __future__ import annotations

import asyncio
import functools
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Generic, TypeVar

from redis.crc import key_slot

from worker.redisio.clients import RedisClient

Req = TypeVar("Req")
Resp = TypeVar("Resp")

MAX_SCRIPT_BATCH = 512  # items per script call: bounds how long one call blocks Redis


async def in_script_batches(
    run: Callable[[list[Req]], Awaitable[Sequence[Resp]]], items: Sequence[Req]
) -> list[Resp]:
    """``run`` over ``items`` in slices of at most ``MAX_SCRIPT_BATCH``, answers in order."""
    answers: list[Resp] = []
    for start in range(0, len(items), MAX_SCRIPT_BATCH):
        answers += await run(list(items[start : start + MAX_SCRIPT_BATCH]))
    return answers


async def in_groups(
    run: Callable[[int, list[Req]], Awaitable[Sequence[Resp]]],
    items: Sequence[Req],
    group_of: Callable[[Req], int],
    *,
    split: bool,
) -> list[Resp]:
    """``run(group, part)`` over ``items``, answers in order.

    ``split``: one part per ``group_of`` value, run concurrently (each in script batches); every
    part is awaited before the first failure, if any, is raised. Not ``split``: one part, named by
    the first item's group.
    """
    if not items:
        return []
    if not split:
        return await in_script_batches(functools.partial(run, group_of(items[0])), items)
    positions: dict[int, list[int]] = {}
    for index, item in enumerate(items):
        positions.setdefault(group_of(item), []).append(index)
    parts = await asyncio.gather(
        *(
            in_script_batches(functools.partial(run, group), [items[i] for i in where])
            for group, where in positions.items()
        ),
        return_exceptions=True,
    )
    answers: list[Resp | None] = [None] * len(items)
    for where, part in zip(positions.values(), parts, strict=True):
        if isinstance(part, BaseException):
            raise part
        for index, answer in zip(where, part, strict=True):
            answers[index] = answer
    return answers  # type: ignore[return-value]  # every position was filled


def slot_of(key: str) -> int:
    """The Redis Cluster hash slot of ``key`` (its hash tag's, if it has one)."""
    return key_slot(key.encode())


async def summed_hashes(client: RedisClient, keys: Iterable[str]) -> Counter[bytes]:
    """The field-by-field sum of the integer hashes ``keys`` (the shards of one figure), read in
    one pipeline: one round trip, one per node on a cluster."""
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.hgetall(key)
    totals: Counter[bytes] = Counter()
    for found in await pipe.execute():
        totals.update({field: int(value) for field, value in found.items()})
    return totals


class MicroBatcher(Generic[Req, Resp]):
    """Runs ``run_batch`` over the requests pending at each flush, at most ``max_concurrent`` at once."""

    def __init__(
        self,
        run_batch: Callable[[list[Req]], Awaitable[Sequence[Resp]]],
        *,
        max_batch: int = 512,
        max_concurrent: int = 1,
    ) -> None:
        self._run_batch = run_batch
        self._max_batch = max_batch
        self._max_concurrent = max_concurrent
        self._pending: list[tuple[Req, asyncio.Future[Resp]]] = []
        self._inflight = 0
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, request: Req) -> Resp:
        """Queue one request and wait for its own response (or the batch's exception)."""
        future: asyncio.Future[Resp] = asyncio.get_running_loop().create_future()
        self._pending.append((request, future))
        self._kick()
        return await future

    def _kick(self) -> None:
        if self._pending and not self._scheduled and self._inflight < self._max_concurrent:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._start)

    def _start(self) -> None:
        self._scheduled = False
        if not self._pending or self._inflight >= self._max_concurrent:
            return
        batch = self._pending[: self._max_batch]
        del self._pending[: self._max_batch]
        self._inflight += 1
        task = asyncio.get_running_loop().create_task(self._run(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[tuple[Req, asyncio.Future[Resp]]]) -> None:
        try:
            results = await self._run_batch([request for request, _ in batch])
        except asyncio.CancelledError:
            for _, future in batch:
                future.cancel()
            raise
        except Exception as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
        else:
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)
        finally:
            self._inflight -= 1
            self._kick()

    async def aclose(self) -> None:
        """Cancel batches still in flight (their callers see ``CancelledError``)."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for _, future in self._pending:
            future.cancel()
        self._pending.clear()
