"""Classification through the cache, computing each distinct text once per replica and, with
Redis, once for the whole cluster (see ``singleflight``)."""

from __future__ import annotations

import asyncio
from typing import Protocol, runtime_checkable

from worker.cache import ClassificationCache, text_hash
from worker.classifiers.base import Classification, Classifier
from worker.counters import Counters
from worker.errors import ClassifierUnavailable, PermanentError, TransientError
from worker.keys import Counter
from worker.singleflight import ClusterFlight, Entry


@runtime_checkable
class Reporting(Protocol):
    """A component that keeps tallies of its own (exported through ``snapshot``)."""

    def snapshot(self) -> dict[str, int]: ...


class CachedClassifier:
    """``classify(text)`` -> (classification, served_from_cache).

    Concurrent requests for the same text share one computation (single flight): the first one
    looks in the cache and, on a miss, asks the classifier (through ``flight`` when the replicas
    share a Redis, so that only one replica of the cluster asks); the others wait for its answer
    and count as cache hits. A failed classification is never cached: every waiter sees the failure.
    """

    def __init__(
        self,
        classifier: Classifier,
        cache: ClassificationCache,
        counters: Counters,
        *,
        flight: ClusterFlight | None = None,
    ) -> None:
        self.classifier = classifier
        self._cache = cache
        self._counters = counters
        self._flight = flight
        self._inflight: dict[str, asyncio.Future[Classification]] = {}
        self.local_waits = 0

    async def classify(self, text: str) -> tuple[Classification, bool]:
        key = text_hash(text)
        shared = self._inflight.get(key)
        if shared is not None:
            self.local_waits += 1
            return await asyncio.shield(shared), True
        future: asyncio.Future[Classification] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            result, computed = await self._lookup_or_compute(text, key)
            future.set_result(result)
            return result, not computed
        except BaseException as exc:
            if not future.done():
                # Waiters must not inherit our cancellation (a timeout of ours is not theirs).
                shared_exc = (
                    exc
                    if isinstance(exc, Exception)
                    else ClassifierUnavailable(
                        "the classification this message waited for was cancelled"
                    )
                )
                future.set_exception(shared_exc)
                future.exception()  # mark retrieved: waiters may be gone
            raise
        finally:
            del self._inflight[key]

    async def _lookup_or_compute(self, text: str, key: str) -> tuple[Classification, bool]:
        """``(classification, computed_here)``."""
        if self._flight is not None and self._cache.shared:
            found = self._cache.get_local(key)
            if found is not None:
                return found, False
            # One script call looks Redis up and, on a miss, takes the text's cluster lock.
            entry = Entry(self._cache.redis_key(key), self._cache.lock_key(key))
            result, computed = await self._flight.run(entry, lambda: self._call(text), self._cache)
            self._cache.remember(key, result, shared=not computed)
            return result, computed
        cached = await self._cache.get(key)
        if cached is not None:
            return cached, False
        result = await self._call(text)
        await self._cache.put(key, result)
        return result, True

    async def _call(self, text: str) -> Classification:
        self._counters.record(Counter.CLASSIFIER_CALLS)
        try:
            return await self.classifier.classify(text)
        except (TransientError, PermanentError):
            raise
        except (OSError, ValueError) as exc:
            raise ClassifierUnavailable(f"{type(exc).__name__}: {exc}") from exc

    async def aclose(self) -> None:
        """Stop the cluster single flight's lock renewals (the cache and classifier close apart)."""
        if self._flight is not None:
            await self._flight.aclose()

    def snapshot(self) -> dict[str, int]:
        """Tallies of the cache tiers, both single flights and the classifier (if it keeps any)."""
        found: dict[str, int] = {"single_flight_local_waits": self.local_waits}
        found.update(self._cache.snapshot())
        if self._flight is not None:
            found.update(self._flight.snapshot())
        if isinstance(self.classifier, Reporting):
            found.update(self.classifier.snapshot())
        return found
