"""A replica's collector after start-up: what start-up built is frozen, young collections are rarer,
and reference cycles made afterwards are still collected."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from worker.core.gc_tuning import YOUNG_THRESHOLD, tune_for_throughput


@pytest.fixture
def restored_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


@pytest.mark.usefixtures("restored_gc")
def test_start_up_objects_are_frozen_and_young_collections_are_rarer() -> None:
    before = gc.get_threshold()
    tune_for_throughput()
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold() == (YOUNG_THRESHOLD, before[1], before[2])


@pytest.mark.usefixtures("restored_gc")
def test_a_cycle_made_after_tuning_is_still_collected_without_being_asked() -> None:
    tune_for_throughput()
    first, second = Node(), Node()
    first.other, second.other = second, first
    gone = weakref.ref(first)
    del first, second
    kept: list[list[int]] = [
        [] for _ in range(YOUNG_THRESHOLD * 2)
    ]  # net allocations: a young collection runs
    assert len(kept) == YOUNG_THRESHOLD * 2
    assert gone() is None
