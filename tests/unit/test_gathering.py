"""Unit tests for the concurrent-await helpers in ``worker.core.gathering``."""

from __future__ import annotations

import pytest

from worker.core.gathering import Unanswered, answered, gather_into


async def test_answers_land_at_their_indices() -> None:
    """``gather_into`` puts each call's answer, or its exception, at that call's index."""
    out: list[int | Exception | None] = [None, 7, None]
    failure = ValueError("no")

    async def fine() -> int:
        return 1

    async def fails() -> int:
        raise failure

    await gather_into(out, [0, 2], [fine(), fails()])
    assert out == [1, 7, failure]


def test_answered_returns_every_answer_in_order() -> None:
    """``answered`` returns the slots' answers, in order, when all of them are filled."""
    assert answered([3, 1, 2], 3) == [3, 1, 2]


def test_an_empty_slot_is_an_error_even_under_optimisation() -> None:
    """An unanswered slot raises ``Unanswered`` (a real check that ``python -O`` keeps)."""
    with pytest.raises(Unanswered, match="1 of 3 slots"):
        answered([3, None, 2], 3)
