"""Micro-batching: requests made by many concurrent messages become one round trip.

Each message awaits ``submit(request)`` as if it were a single call. Requests submitted in the same
event-loop turn, and those that arrive while a batch is in flight, are handed to ``run_batch``
together. Under load batches grow by themselves; a lone message waits only for the next loop turn.

``in_script_batches`` is the other half: a batch a caller already holds, cut into script calls of
at most ``MAX_SCRIPT_BATCH`` items.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

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
