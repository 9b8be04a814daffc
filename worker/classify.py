"""Classification through the cache, computing each distinct text at most once per replica at a time."""

from __future__ import annotations

import asyncio

from worker.cache import ClassificationCache, text_hash
from worker.classifiers.base import Classification, Classifier
from worker.counters import Counters
from worker.errors import ClassifierUnavailable, PermanentError, TransientError
from worker.keys import Counter


class CachedClassifier:
    """``classify(text)`` -> (classification, served_from_cache).

    Concurrent requests for the same text share one computation (single flight): the first one
    looks in the cache and, on a miss, asks the classifier; the others wait for its answer and count
    as cache hits. A failed classification is never cached: every waiter sees the failure.
    """

    def __init__(
        self, classifier: Classifier, cache: ClassificationCache, counters: Counters
    ) -> None:
        self.classifier = classifier
        self._cache = cache
        self._counters = counters
        self._inflight: dict[str, asyncio.Future[Classification]] = {}

    async def classify(self, text: str) -> tuple[Classification, bool]:
        key = text_hash(text)
        shared = self._inflight.get(key)
        if shared is not None:
            return await asyncio.shield(shared), True
        future: asyncio.Future[Classification] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            cached = await self._cache.get(key)
            if cached is not None:
                future.set_result(cached)
                return cached, True
            result = await self._call(text)
            future.set_result(result)
            await self._cache.put(key, result)
            return result, False
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

    async def _call(self, text: str) -> Classification:
        self._counters.record(Counter.CLASSIFIER_CALLS)
        try:
            return await self.classifier.classify(text)
        except (TransientError, PermanentError):
            raise
        except (OSError, ValueError) as exc:
            raise ClassifierUnavailable(f"{type(exc).__name__}: {exc}") from exc
