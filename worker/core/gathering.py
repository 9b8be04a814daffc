"""Awaiting several calls at once, with as little machinery as the common case allows."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Coroutine, Iterable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


async def run_all(work: Sequence[Coroutine[Any, Any, None]]) -> None:
    """Run ``work`` concurrently; a single coroutine is awaited as it is, without a task."""
    if len(work) == 1:
        await work[0]
    elif work:
        await asyncio.gather(*work)


async def gather_into(
    out: list[T | Exception | None], indices: Sequence[int], calls: Iterable[Awaitable[T]]
) -> None:
    """Await ``calls`` concurrently and put each answer, or its exception, at its index in
    ``out``. A cancellation (or any other ``BaseException``) is raised, not stored."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    for index, result in zip(indices, results, strict=True):
        if isinstance(result, BaseException) and not isinstance(result, Exception):
            raise result
        out[index] = result


class Unanswered(RuntimeError):
    """A slot that should hold an answer is empty: a bug in the caller, never a retryable error."""


def answered(out: list[T | None], expected: int) -> list[T]:
    """``out`` once every one of its ``expected`` slots holds an answer.

    Raise ``Unanswered`` otherwise: a real check, not an ``assert``, so that ``python -O`` cannot
    turn a forgotten slot into a short, silently misaligned list of answers.
    """
    done = [answer for answer in out if answer is not None]
    if len(done) != expected:
        raise Unanswered(f"{expected - len(done)} of {expected} slots were never answered")
    return done
