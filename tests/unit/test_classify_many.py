"""Classifying a batch gives each text what ``classify`` would, and keeps once-per-cluster."""

from __future__ import annotations

import asyncio

from tests.unit.test_cache_tiers import KEYS, CountingClassifier, Replica, classify
from worker.classification.cache import ClassificationCache, LocalCache
from worker.classification.cached import CachedClassifier
from worker.classification.classifiers.base import Classification
from worker.core.errors import ClassifierUnavailable
from worker.observability.counters import Counters
from worker.observability.metrics import CounterName
from worker.redisio.link import RedisLink


class ImmediateCounting(CountingClassifier):
    """Answers inline (``immediate``): the batch path calls ``classify_sync`` without awaiting."""

    immediate = True

    def classify_sync(self, text: str) -> Classification:
        self.calls.append(text)
        if text.startswith("bad"):
            raise ValueError("cannot read it")
        return Classification(f"label-{len(text)}", 0.5, "counting")


async def test_a_batch_asks_each_distinct_text_once_and_marks_the_rest_cached(
    links: list[RedisLink],
) -> None:
    """Repeats inside a batch share the first one's answer (served from cache); the other
    replica's batch finds every text in Redis; a failing text fails alone, and is not cached."""
    first_classifier, second_classifier = ImmediateCounting(), ImmediateCounting()
    first, second = Replica(links[0], first_classifier), Replica(links[1], second_classifier)
    texts = ["a", "bb", "a", "ccc", "bad one", "bb"]
    try:
        answers = await first.cached.classify_many(texts)
        assert first_classifier.calls == ["a", "bb", "ccc", "bad one"]
        assert [a if isinstance(a, Exception) else (a[0].label, a[1]) for a in answers[:4]] == [
            ("label-1", False),
            ("label-2", False),
            ("label-1", True),
            ("label-3", False),
        ]
        assert isinstance(answers[4], ClassifierUnavailable)
        assert answers[5] == (answers[1][0], True)  # type: ignore[index]
        assert first.counters.local[CounterName.CLASSIFIER_CALLS] == 4
        again = await second.cached.classify_many(texts[:4])
        assert second_classifier.calls == []
        assert [a[1] for a in again] == [True] * 4  # type: ignore[index]
        assert second.cache.snapshot()["cache_redis_hits"] == 3
        retried = await second.cached.classify_many(["bad one"])
        assert second_classifier.calls == ["bad one"]  # the failure was not cached
        assert isinstance(retried[0], ClassifierUnavailable)
    finally:
        await first.aclose()
        await second.aclose()


async def test_a_batch_waits_for_a_text_already_in_flight_here(links: list[RedisLink]) -> None:
    """A text being classified by another task of the replica is not asked again by a batch."""
    classifier = CountingClassifier(delay_s=0.2)
    replica = Replica(links[0], classifier)
    try:
        alone = asyncio.ensure_future(classify(replica.cached, "slow"))
        while not classifier.calls:  # the other task is classifying "slow"
            await asyncio.sleep(0.005)
        batch = await replica.cached.classify_many(["slow", "other"])
        assert classifier.calls == ["slow", "other"]
        assert (await alone)[1] is False
        assert [a[1] for a in batch] == [True, False]  # type: ignore[index]
    finally:
        await replica.aclose()


async def test_without_redis_a_batch_uses_the_local_tier() -> None:
    """In-memory mode: a text classified once is served from the replica's own cache."""
    classifier = ImmediateCounting()
    cache = ClassificationCache(LocalCache(10), link=None, keys=KEYS, identity="m", ttl_s=60)
    cached = CachedClassifier(classifier, cache, Counters(cluster=False))
    first = await cached.classify_many(["x", "yy", "x"])
    second = await cached.classify_many(["yy"])
    assert classifier.calls == ["x", "yy"]
    assert [a[1] for a in first] == [False, False, True]  # type: ignore[index]
    assert second[0][1] is True  # type: ignore[index]
