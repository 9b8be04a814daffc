"""Classification through the cache, computing each distinct text once per replica and, with
Redis, once for the whole cluster (see ``singleflight``)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Protocol, cast, runtime_checkable

from worker.classification.cache import ClassificationCache, text_hash
from worker.classification.classifiers.base import Classification, Classifier, Immediate
from worker.classification.singleflight import ClusterFlight, Entry
from worker.core.errors import ClassifierUnavailable, PermanentError, TransientError
from worker.core.gathering import answered, gather_into
from worker.observability.counters import Counters
from worker.observability.metrics import CounterName

Classified = tuple[Classification, bool]  # (classification, served_from_cache)


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
                _share_failure(future, exc)
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
            entry = self._entry(key)
            result, computed = await self._flight.run(entry, lambda: self._call(text), self._cache)
            self._cache.remember(key, result, shared=not computed)
            return result, computed
        cached = await self._cache.get(key)
        if cached is not None:
            return cached, False
        result = await self._call(text)
        await self._cache.put(key, result)
        return result, True

    async def classify_many(self, texts: Sequence[str]) -> list[Classified | Exception]:
        """``classify`` for each of ``texts``, with the same answers and tallies, but one Redis
        round trip per step for all of them (``ClusterFlight.run_many``) and no task per text.
        Each answer is ``(classification, served_from_cache)`` or that text's exception."""
        out: list[Classified | Exception | None] = [None] * len(texts)
        keys = [text_hash(text) for text in texts]
        leaders: dict[str, int] = {}  # the first index of each text this call looks up
        followers: list[int] = []  # a text already led in this call: shares its answer
        elsewhere: list[int] = []  # in flight in another task: waits through ``classify``
        shared = self._flight is not None and self._cache.shared
        for index, key in enumerate(keys):
            if key in leaders:
                followers.append(index)
            elif key in self._inflight:
                elsewhere.append(index)
            elif shared and (found := self._cache.get_local(key)) is not None:
                out[index] = (found, True)
            else:
                leaders[key] = index
        if leaders:
            loop = asyncio.get_running_loop()
            futures = {key: loop.create_future() for key in leaders}
            self._inflight.update(futures)
            try:
                answers = await self._lead(texts, leaders, shared)
            except BaseException as exc:
                for future in futures.values():
                    _share_failure(future, exc)
                raise
            finally:
                for key in leaders:
                    del self._inflight[key]
            for (key, index), answer in zip(leaders.items(), answers, strict=True):
                out[index] = answer
                if isinstance(answer, Exception):
                    _share_failure(futures[key], answer)
                else:
                    futures[key].set_result(answer[0])
        for index in followers:
            led = out[leaders[keys[index]]]
            assert led is not None
            if isinstance(led, Exception):
                out[index] = led
            else:
                self.local_waits += 1
                out[index] = (led[0], True)
        if elsewhere:
            await gather_into(out, elsewhere, (self.classify(texts[i]) for i in elsewhere))
        return answered(out, len(texts))

    async def _lead(
        self, texts: Sequence[str], leaders: dict[str, int], shared: bool
    ) -> list[Classified | Exception]:
        """Look up, compute and store the texts at ``leaders`` (one per distinct text)."""
        indices = list(leaders.values())
        hashes = list(leaders)
        if shared and self._flight is not None:
            entries = [self._entry(k) for k in hashes]

            async def compute_many(owned: list[int]) -> list[Classification | Exception]:
                return await self._call_many([texts[indices[i]] for i in owned])

            async def compute(position: int) -> Classification:
                return await self._call(texts[indices[position]])

            answers = await self._flight.run_many(entries, compute_many, compute, self._cache)
            out: list[Classified | Exception] = []
            for key, answer in zip(hashes, answers, strict=True):
                if isinstance(answer, Exception):
                    out.append(answer)
                else:
                    self._cache.remember(key, answer[0], shared=not answer[1])
                    out.append((answer[0], not answer[1]))
            return out
        found = [await self._cache.get(key) for key in hashes]  # no Redis: nothing suspends
        missing = [i for i, f in enumerate(found) if f is None]
        computed = iter(await self._call_many([texts[indices[i]] for i in missing]))
        out = []
        for key, hit in zip(hashes, found, strict=True):
            if hit is not None:
                out.append((hit, True))
                continue
            result = next(computed)
            if not isinstance(result, Exception):
                await self._cache.put(key, result)
                result_out: Classified | Exception = (result, False)
            else:
                result_out = result
            out.append(result_out)
        return out

    async def _call_many(self, texts: list[str]) -> list[Classification | Exception]:
        """Ask the classifier about each text: inline when it answers without awaiting."""
        if isinstance(self.classifier, Immediate) and self.classifier.immediate:
            results: list[Classification | Exception] = []
            for text in texts:
                self._counters.record(CounterName.CLASSIFIER_CALLS)
                try:
                    results.append(self.classifier.classify_sync(text))
                except (TransientError, PermanentError) as exc:
                    results.append(exc)
                except (OSError, ValueError) as exc:
                    results.append(_unavailable(exc))
            return results
        answers = await asyncio.gather(
            *(self._call(text) for text in texts), return_exceptions=True
        )
        for answer in answers:
            if isinstance(answer, BaseException) and not isinstance(answer, Exception):
                raise answer
        return cast(list[Classification | Exception], answers)  # BaseExceptions were raised

    async def _call(self, text: str) -> Classification:
        self._counters.record(CounterName.CLASSIFIER_CALLS)
        try:
            return await self.classifier.classify(text)
        except (TransientError, PermanentError):
            raise
        except (OSError, ValueError) as exc:
            raise _unavailable(exc) from exc

    def _entry(self, hashed_text: str) -> Entry:
        """The Redis keys of a text's cache entry and of its single-flight lock."""
        return Entry(self._cache.redis_key(hashed_text), self._cache.lock_key(hashed_text))

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


def _unavailable(exc: OSError | ValueError) -> ClassifierUnavailable:
    """A classifier's I/O or decoding failure, as the worker's transient error."""
    return ClassifierUnavailable(f"{type(exc).__name__}: {exc}")


def _share_failure(future: asyncio.Future[Classification], exc: BaseException) -> None:
    """Fail the computation others wait for. Waiters must not inherit a cancellation (a timeout
    of ours is not theirs); the future is marked retrieved, as the waiters may be gone."""
    if not isinstance(exc, Exception):
        exc = ClassifierUnavailable("the classification this message waited for was cancelled")
    future.set_exception(exc)
    future.exception()
