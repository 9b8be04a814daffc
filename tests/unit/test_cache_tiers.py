"""The two-tier cache with single flight: hits per tier, versioned keys, once per cluster."""

from __future__ import annotations

import asyncio

from worker.classification.cache import (
    KEY_FORMAT_VERSION,
    ClassificationCache,
    LocalCache,
    classifier_key,
)
from worker.classification.cached import CachedClassifier, Classified
from worker.classification.classifiers.base import Classification
from worker.classification.locks import ClusterLocks
from worker.classification.singleflight import ClusterFlight
from worker.classification.text import text_hash
from worker.core.errors import ClassifierUnavailable
from worker.observability.counters import Counters
from worker.observability.metrics import CounterName
from worker.redisio.keys import RedisKeys
from worker.redisio.link import RedisLink

KEYS = RedisKeys("unit:")


class CountingClassifier:
    """A classifier that takes ``delay_s``, counts its calls and can be told to fail."""

    def __init__(self, identity: str = "counting:v1", delay_s: float = 0.1) -> None:
        self._identity = identity
        self.delay_s = delay_s
        self.calls: list[str] = []
        self.failures_left = 0

    @property
    def name(self) -> str:
        return "counting"

    @property
    def identity(self) -> str:
        return self._identity

    async def classify(self, text: str) -> Classification:
        self.calls.append(text)
        await asyncio.sleep(self.delay_s)
        if self.failures_left:
            self.failures_left -= 1
            raise ClassifierUnavailable("scripted failure")
        return Classification("question", 0.8, "counting")

    async def aclose(self) -> None:
        return None


async def classify(cached: CachedClassifier, text: str) -> Classified:
    """``classify_many`` for one text: ``(classification, served_from_cache)``, or it raises."""
    answer = (await cached.classify_many([text]))[0]
    if isinstance(answer, Exception):
        raise answer
    return answer


class Replica:
    """The classification path of one replica: its own LRU and locks, the shared Redis."""

    def __init__(self, link: RedisLink, classifier: CountingClassifier) -> None:
        self.link = link
        self.cache = ClassificationCache(
            LocalCache(100), link=link, keys=KEYS, identity=classifier.identity, ttl_s=60
        )
        self.counters = Counters(cluster=True)
        self.cached = CachedClassifier(
            classifier,
            self.cache,
            self.counters,
            flight=ClusterFlight(ClusterLocks(link), wait_s=5),
        )

    async def aclose(self) -> None:
        await self.cached.aclose()
        await self.cache.aclose()


def test_key_covers_the_format_version() -> None:
    """The classifier part of a key hashes the key-format version with the identity."""
    assert KEY_FORMAT_VERSION >= 2
    assert classifier_key("llm:v1:model-a:abc") != classifier_key("llm:v1:model-b:abc")
    cache = ClassificationCache(LocalCache(1), link=None, keys=KEYS, identity="x", ttl_s=1)
    key = cache.redis_key(text_hash("hi"))
    assert key == KEYS.cache(classifier_key("x"), text_hash("hi"))
    assert cache.lock_key(text_hash("hi")) == KEYS.lock(classifier_key("x"), text_hash("hi"))


async def test_hits_are_counted_per_tier(links: list[RedisLink]) -> None:
    """A lookup is a local hit, a Redis hit (then copied to the LRU) or a miss, and is counted so."""
    writer = ClassificationCache(LocalCache(10), link=links[0], keys=KEYS, identity="x", ttl_s=60)
    reader = ClassificationCache(LocalCache(10), link=links[1], keys=KEYS, identity="x", ttl_s=60)
    try:
        assert await reader.get("h1") is None
        await writer.put("h1", Classification("spam", 0.9, "x"))
        assert await reader.get("h1") == Classification("spam", 0.9, "x")
        assert await reader.get("h1") == Classification("spam", 0.9, "x")
        assert reader.snapshot() == {
            "cache_local_hits": 1,
            "cache_redis_hits": 1,
            "cache_lookup_misses": 1,
            "cache_local_entries": 1,
        }
    finally:
        await writer.aclose()
        await reader.aclose()


async def test_same_text_on_three_replicas_is_classified_once(
    links: list[RedisLink],
) -> None:
    """Thirty concurrent requests for one text, ten per replica, make one classifier call; the
    others are served as cache hits, from another replica's computation or their own."""
    classifier = CountingClassifier()
    replicas = [Replica(link, classifier) for link in links]
    try:
        text = "Где мой заказ?"
        results = await asyncio.gather(
            *(
                classify(r.cached, f" {text} " if i % 2 else text)
                for r in replicas
                for i in range(10)
            )
        )
        assert len(classifier.calls) == 1
        assert sum(1 for _, cached in results if not cached) == 1
        assert {c.label for c, _ in results} == {"question"}
        snapshots = [r.cached.snapshot() for r in replicas]
        assert sum(s["single_flight_local_waits"] for s in snapshots) == 27
        assert sum(s["single_flight_cluster_waits"] for s in snapshots) == 2
        assert sum(r.counters.local[CounterName.CLASSIFIER_CALLS] for r in replicas) == 1
    finally:
        for replica in replicas:
            await replica.aclose()


async def test_a_failed_classification_is_not_cached(links: list[RedisLink]) -> None:
    """When the classifier fails, every waiter sees the failure and the next request computes."""
    classifier = CountingClassifier()
    classifier.failures_left = 1
    replica = Replica(links[0], classifier)
    try:
        outcomes = await asyncio.gather(
            *(classify(replica.cached, "hello") for _ in range(3)), return_exceptions=True
        )
        assert all(isinstance(o, ClassifierUnavailable) for o in outcomes)
        assert await links[0].client.keys(KEYS.cache("*", "*")) == []
        assert await classify(replica.cached, "hello") == (
            Classification("question", 0.8, "counting"),
            False,
        )
        assert len(classifier.calls) == 2
    finally:
        await replica.aclose()


async def test_changing_the_identity_misses(links: list[RedisLink]) -> None:
    """A classifier with another identity (say, another model) does not see earlier entries."""
    old, new = CountingClassifier("llm:v1:model-a:p"), CountingClassifier("llm:v1:model-b:p")
    first, second = Replica(links[0], old), Replica(links[1], new)
    try:
        assert (await classify(first.cached, "hi"))[1] is False
        assert (await classify(second.cached, "hi"))[1] is False
        assert (len(old.calls), len(new.calls)) == (1, 1)
    finally:
        await first.aclose()
        await second.aclose()
