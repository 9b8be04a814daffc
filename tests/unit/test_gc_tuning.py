"""A replica's collector after start-up: what start-up built is frozen, young collections are rarer,
and reference cycles made afterwards are still collected."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from typing import Any

import pytest

from worker.core.gc_tuning import YOUNG_THRESHOLD, tune_for_throughput


@pytest.fixture
def restored_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


@pytest.fixture
def collections() -> Iterator[list[int]]:
    """The generations of the collections that start while the test runs, in order."""
    started: list[int] = []

    def record(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started.append(info["generation"])

    gc.callbacks.append(record)
    yield started
    gc.callbacks.remove(record)


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def cycle() -> tuple[Node, weakref.ref[Node]]:
    """Two nodes that refer to each other (only the collector frees them), and a weak reference."""
    first, second = Node(), Node()
    first.other, second.other = second, first
    return first, weakref.ref(first)


@pytest.mark.usefixtures("restored_gc")
def test_tuning_sets_only_the_young_threshold() -> None:
    """Tuning keeps the older generations' thresholds and sets the young one to YOUNG_THRESHOLD."""
    before = gc.get_threshold()
    tune_for_throughput()
    assert gc.get_threshold() == (YOUNG_THRESHOLD, before[1], before[2])


@pytest.mark.usefixtures("restored_gc")
def test_no_collection_runs_before_young_threshold_allocations(collections: list[int]) -> None:
    """After tuning, half of YOUNG_THRESHOLD net allocations start no collection; twice it does."""
    tune_for_throughput()
    collections.clear()  # the full collection tuning itself runs
    kept: list[list[int]] = [[] for _ in range(YOUNG_THRESHOLD // 2)]
    during_half = len(collections)
    kept += [[] for _ in range(YOUNG_THRESHOLD * 2)]
    assert during_half == 0
    assert collections, "no collection ran after twice YOUNG_THRESHOLD net allocations"


@pytest.mark.usefixtures("restored_gc")
def test_what_start_up_built_is_never_collected() -> None:
    """An object alive when tuning runs is frozen: even as cyclic garbage a full collection keeps it."""
    node, alive = cycle()
    tune_for_throughput()
    del node
    gc.collect()
    assert alive() is not None


@pytest.mark.usefixtures("restored_gc")
def test_a_cycle_made_after_tuning_is_still_collected_without_being_asked(
    collections: list[int],
) -> None:
    """A reference cycle dropped after tuning is freed by a young collection, without gc.collect()."""
    tune_for_throughput()
    node, alive = cycle()
    del node
    collections.clear()
    kept: list[list[int]] = [[] for _ in range(YOUNG_THRESHOLD * 2)]
    assert collections, f"no collection ran in {len(kept)} net allocations"
    assert alive() is None
