"""Classification through the cache, computing each distinct text once per replica and, with
Redis, once for the whole cluster (see ``singleflight``)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, cast, runtime_checkable

from worker.classification.cache import ClassificationCache
from worker.classification.classifiers.base import Classification, Classifier, Immediate
from worker.classification.locks import Entry
from worker.classification.singleflight import ClusterFlight
from worker.classification.text import text_hash
from worker.core.errors import (
    ClassifierPaused,
    ClassifierUnavailable,
    PermanentError,
    TransientError,
)
from worker.core.gathering import answered, gather_into
from worker.observability.counters import Counters
from worker.observability.metrics import CounterName

Classified = tuple[Classification, bool]  # (classification, served_from_cache)


@dataclass(slots=True)
class _Plan:
    """What ``classify_many`` does with each text (by index)."""

    out: list[Classified | Exception | None]
    leaders: dict[str, int] = field(default_factory=dict)  # first index of each text looked up
    followers: list[int] = field(default_factory=list)  # a repeat of a leader: shares its answer
    # in flight in another task of the replica: waits for it
    elsewhere: dict[int, asyncio.Future[Classification]] = field(default_factory=dict)


@runtime_checkable
class Reporting(Protocol):
    """A component that keeps tallies of its own (exported through ``snapshot``)."""

    def snapshot(self) -> dict[str, int]: ...


class CachedClassifier:
    """``classify_many(texts)`` -> per text (classification, served_from_cache) or its exception.

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

    async def classify_many(self, texts: Sequence[str]) -> list[Classified | Exception]:
        """Each of ``texts`` classified, with one Redis round trip per step for all of them
        (``ClusterFlight.run_many``) and no task per text. Each answer is ``(classification,
        served_from_cache)`` or that text's exception."""
        keys = [text_hash(text) for text in texts]
        shared = self._flight is not None and self._cache.shared
        plan = self._plan(keys, shared)
        if plan.leaders:
            await self._lead_in_flight(texts, plan, shared)
        for index in plan.followers:
            led = plan.out[plan.leaders[keys[index]]]
            if isinstance(led, tuple):
                self.local_waits += 1
                led = (led[0], True)
            plan.out[index] = led
        if plan.elsewhere:
            waits = (self._share(future) for future in plan.elsewhere.values())
            await gather_into(plan.out, list(plan.elsewhere), waits)
        return answered(plan.out, len(texts))

    def _plan(self, keys: list[str], shared: bool) -> _Plan:
        """Sort the texts: served by the local tier, led here, or following another's flight."""
        plan = _Plan([None] * len(keys))
        for index, key in enumerate(keys):
            if key in plan.leaders:
                plan.followers.append(index)
            elif (future := self._inflight.get(key)) is not None:
                plan.elsewhere[index] = future
            elif shared and (found := self._cache.get_local(key)) is not None:
                plan.out[index] = (found, True)
            else:
                plan.leaders[key] = index
        return plan

    async def _share(self, future: asyncio.Future[Classification]) -> Classified:
        """The answer of a text another task of this replica is classifying."""
        self.local_waits += 1
        return await asyncio.shield(future), True

    async def _lead_in_flight(self, texts: Sequence[str], plan: _Plan, shared: bool) -> None:
        """Classify the leaders, each under a future other tasks may wait on meanwhile."""
        loop = asyncio.get_running_loop()
        futures = {key: loop.create_future() for key in plan.leaders}
        self._inflight.update(futures)
        try:
            answers = await self._lead([texts[i] for i in plan.leaders.values()], plan, shared)
        except BaseException as exc:
            for future in futures.values():
                _share_failure(future, exc)
            raise
        finally:
            for key in plan.leaders:
                del self._inflight[key]
        for (key, index), answer in zip(plan.leaders.items(), answers, strict=True):
            plan.out[index] = answer
            if isinstance(answer, Exception):
                _share_failure(futures[key], answer)
            else:
                futures[key].set_result(answer[0])

    async def _lead(
        self, texts: list[str], plan: _Plan, shared: bool
    ) -> list[Classified | Exception]:
        """Look up, compute and store ``texts`` (one per distinct text, keys ``plan.leaders``)."""
        hashes = list(plan.leaders)
        if shared and self._flight is not None:
            return await self._lead_shared(self._flight, hashes, texts)
        found = [await self._cache.get(key) for key in hashes]  # no Redis: nothing suspends
        missing = [i for i, f in enumerate(found) if f is None]
        computed = iter(await self._call_many([texts[i] for i in missing]))
        out: list[Classified | Exception] = []
        for key, hit in zip(hashes, found, strict=True):
            if hit is not None:
                out.append((hit, True))
                continue
            result = next(computed)
            if not isinstance(result, Exception):
                await self._cache.put(key, result)
                out.append((result, False))
            else:
                out.append(result)
        return out

    async def _lead_shared(
        self, flight: ClusterFlight, hashes: list[str], texts: list[str]
    ) -> list[Classified | Exception]:
        """``_lead`` through the cluster single flight: once for every replica."""

        async def compute_many(owned: list[int]) -> list[Classification | Exception]:
            return await self._call_many([texts[i] for i in owned])

        async def compute(position: int) -> Classification:
            return await self._call(texts[position])

        entries = [self._entry(key) for key in hashes]
        answers = await flight.run_many(entries, compute_many, compute, self._cache)
        out: list[Classified | Exception] = []
        for key, answer in zip(hashes, answers, strict=True):
            if isinstance(answer, Exception):
                out.append(answer)
                continue
            value, computed = answer
            self._cache.remember(key, value, shared=not computed)
            out.append((value, not computed))
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
        asked = True  # not when the classifier's breaker refused it: nothing was asked
        try:
            return await self.classifier.classify(text)
        except ClassifierPaused:
            asked = False
            raise
        except (TransientError, PermanentError):
            raise
        except (OSError, ValueError) as exc:
            raise _unavailable(exc) from exc
        finally:
            if asked:
                self._counters.record(CounterName.CLASSIFIER_CALLS)

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
