"""The classification cache: a bounded local LRU in front of Redis, keyed by normalised text.

A key covers the key-format version, the classifier's identity (kind, version, model, prompt,
label set ...) and a hash of the normalised text (see ``text``), so a classification stored under
a key can never change: serving it from the local tier is always safe, and changing the classifier
makes old entries miss instead of going stale. Hits are counted per tier.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Final

import orjson
import structlog

from worker.classification.classifiers.base import Classification
from worker.redisio.batching import MicroBatcher, in_groups, slot_of
from worker.redisio.clients import is_cluster
from worker.redisio.keys import RedisKeys
from worker.redisio.link import REDIS_ERRORS, RedisLink

log = structlog.get_logger("worker.classification.cache")

# Bump when the text normalisation or the stored value's format changes: every key then changes.
KEY_FORMAT_VERSION: Final = 2


def classifier_key(identity: str) -> str:
    """A short, stable name for a classifier identity (and the key format) inside cache keys."""
    versioned = f"{KEY_FORMAT_VERSION}\n{identity}"
    return hashlib.blake2b(versioned.encode(), digest_size=6).hexdigest()


def _encode(classification: Classification) -> bytes:
    return orjson.dumps(
        {
            "label": classification.label,
            "confidence": classification.confidence,
            "classifier": classification.classifier,
        }
    )


def _decode(raw: bytes) -> Classification | None:
    try:
        data: Any = orjson.loads(raw)
        return Classification(
            str(data["label"]), float(data["confidence"]), str(data["classifier"])
        )
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None  # an entry we cannot read is a miss, and will be overwritten


class LocalCache:
    """A bounded LRU of classifications (size 0 disables it)."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._entries: OrderedDict[str, Classification] = OrderedDict()

    def get(self, key: str) -> Classification | None:
        found = self._entries.get(key)
        if found is not None:
            self._entries.move_to_end(key)
        return found

    def put(self, key: str, classification: Classification) -> None:
        if self._size <= 0:
            return
        self._entries[key] = classification
        self._entries.move_to_end(key)
        if len(self._entries) > self._size:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


class ClassificationCache:
    """Two tiers: ``LocalCache``, then Redis (when configured and reachable) shared by the cluster."""

    def __init__(
        self,
        local: LocalCache,
        *,
        link: RedisLink | None,
        keys: RedisKeys,
        identity: str,
        ttl_s: int,
    ) -> None:
        self._local = local
        self._link = link
        self._keys = keys
        self._classifier_key = classifier_key(identity)
        self._ttl_s = ttl_s
        self._gets: MicroBatcher[str, bytes | None] = MicroBatcher(self._get_batch)
        self._puts: MicroBatcher[tuple[str, bytes], None] = MicroBatcher(self._put_batch)
        self.local_hits = 0
        self.redis_hits = 0
        self.misses = 0

    @property
    def ttl_s(self) -> int:
        return self._ttl_s

    def encode(self, classification: Classification) -> bytes:
        return _encode(classification)

    def decode(self, raw: bytes) -> Classification | None:
        return _decode(raw)

    @property
    def shared(self) -> bool:
        """True while Redis (the tier every replica sees) is configured and reachable."""
        return self._link is not None and self._link.available

    def redis_key(self, hashed_text: str) -> str:
        return self._keys.cache(self._classifier_key, hashed_text)

    def lock_key(self, hashed_text: str) -> str:
        """The single-flight lock of one entry (see ``singleflight``)."""
        return self._keys.lock(self._classifier_key, hashed_text)

    def get_local(self, hashed_text: str) -> Classification | None:
        """The local tier alone (counted as a local hit when found)."""
        found = self._local.get(hashed_text)
        if found is not None:
            self.local_hits += 1
        return found

    def remember(self, hashed_text: str, classification: Classification, *, shared: bool) -> None:
        """Keep in the local tier what was read from Redis (``shared``) or computed after a miss
        by the caller itself, which also stored it in Redis (see ``singleflight``)."""
        self._local.put(hashed_text, classification)
        if shared:
            self.redis_hits += 1
        else:
            self.misses += 1

    async def get(self, hashed_text: str) -> Classification | None:
        found = self.get_local(hashed_text)
        if found is not None:
            return found
        if self._link is None or not self._link.available:
            self.misses += 1
            return None
        try:
            raw = await self._gets.submit(self.redis_key(hashed_text))
        except REDIS_ERRORS as exc:
            self._link.report_aside(exc)
            self.misses += 1
            return None
        found = _decode(raw) if raw is not None else None
        if found is None:
            self.misses += 1
            return None
        self.redis_hits += 1
        self._local.put(hashed_text, found)
        return found

    def snapshot(self) -> dict[str, int]:
        """Lookups by outcome: found in the local LRU, found in Redis, not found."""
        return {
            "cache_local_hits": self.local_hits,
            "cache_redis_hits": self.redis_hits,
            "cache_lookup_misses": self.misses,
            "cache_local_entries": len(self._local),
        }

    async def put(self, hashed_text: str, classification: Classification) -> None:
        self._local.put(hashed_text, classification)
        if self._link is None or not self._link.available:
            return
        try:
            await self._puts.submit((self.redis_key(hashed_text), _encode(classification)))
        except REDIS_ERRORS as exc:
            self._link.report_aside(exc)

    async def _get_batch(self, keys: list[str]) -> Sequence[bytes | None]:
        assert self._link is not None
        client = self._link.client

        async def mget(_slot: int, part: list[str]) -> list[bytes | None]:
            found: list[bytes | None] = await client.mget(part)
            return found

        # An MGET must stay in one slot on a cluster: one per slot, all at once.
        return await in_groups(mget, keys, slot_of, split=is_cluster(client))

    async def _put_batch(self, items: list[tuple[str, bytes]]) -> list[None]:
        assert self._link is not None
        pipe = self._link.client.pipeline(transaction=False)
        for key, value in items:
            pipe.set(key, value, ex=self._ttl_s)
        await pipe.execute()
        return [None] * len(items)

    async def aclose(self) -> None:
        await self._gets.aclose()
        await self._puts.aclose()
