"""The micro-batcher turns concurrent calls into one batch and routes answers and errors back."""

from __future__ import annotations

import asyncio

import pytest

from worker.redisio.batching import MicroBatcher


async def test_concurrent_submits_share_one_batch() -> None:
    """Fifty requests made together run as a single batch, each caller getting its own answer."""
    batches: list[list[int]] = []

    async def double(batch: list[int]) -> list[int]:
        batches.append(batch)
        return [x * 2 for x in batch]

    batcher: MicroBatcher[int, int] = MicroBatcher(double, max_concurrent=1)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(50)))
    assert results == [i * 2 for i in range(50)]
    assert batches == [list(range(50))]


async def test_batches_respect_the_size_limit() -> None:
    """With ``max_batch=10``, 25 requests run as batches of 10, 10 and 5."""
    sizes: list[int] = []

    async def echo(batch: list[int]) -> list[int]:
        sizes.append(len(batch))
        return batch

    batcher: MicroBatcher[int, int] = MicroBatcher(echo, max_batch=10, max_concurrent=1)
    assert await asyncio.gather(*(batcher.submit(i) for i in range(25))) == list(range(25))
    assert sizes == [10, 10, 5]


async def test_a_failing_batch_fails_each_caller() -> None:
    """An exception raised by the batch function reaches every caller of that batch."""

    async def broken(batch: list[int]) -> list[int]:
        raise ConnectionError("down")

    batcher: MicroBatcher[int, int] = MicroBatcher(broken)
    results = await asyncio.gather(batcher.submit(1), batcher.submit(2), return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results)
    with pytest.raises(ConnectionError):
        await batcher.submit(3)
