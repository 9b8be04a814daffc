"""The Redis key layout, in one place. Every key starts with ``REDIS_KEY_PREFIX`` ({p} below).

{p}done:{t}:{message_id}      "1"         processed marker, TTL = DEDUP_TTL_S
{p}claim:{t}:{message_id}     token       lease of the replica working on it, TTL = lease
{p}attempts:{t}:{message_id}  integer     attempts started (raised at claim time), TTL = DEDUP_TTL_S,
                                          deleted when the message is done
{p}cache:{t}:{classifier}:{hash}  JSON    classification of a normalised text, TTL = CACHE_TTL_S
{p}lock:{t}:{classifier}:{hash}   token   single-flight lock of the replica classifying that text
{p}llm:{llm}:rate             timestamp   GCRA pacing of LLM calls for the whole cluster
{p}llm:{llm}:cooldown         timestamp   set by a 429: every replica waits until then
{p}stats:{t}                  hash        one shard of the cluster counters (fields: ``CounterName``)
{p}tp:{t}:{epoch_minute}      hash        one shard of the messages processed per second of that
                                          minute (field: the epoch second), TTL 15 min
{p}replica:{t0}:{replica_id}  JSON        heartbeat of a live replica, TTL 3 heartbeats
{p}replicas:{t0}              set         replica IDs that have sent a heartbeat
{p}breaker:{classifier}       hash        circuit breaker of a classifier (fields: breaker.lua);
                                          the identity, in braces, is a hash tag; TTL 7 days

``{t}`` is a Redis Cluster *hash tag*: one of ``SHARDS`` short strings, chosen by the message ID
(or the text hash) alone, so a message's claim, done marker and attempts, and a cached value and
its lock, are always in one slot, as are the counters and throughput shard of the same tag. A
batch is cut by shard (``batching.in_groups``) and each shard's part is one script call; on a
single Redis the whole batch is one call and its counts go to the first item's shard. Counters
and throughput are summed over the shards when read. The heartbeats and the counters a replica
flushes itself use the tag of shard 0 (``t0``), so a flush and a stats read are one slot each.

The tags are fixed (``SHARD_TAGS``; changing one moves the keys it covers: done markers would be
forgotten). Each tag's slot lies in the middle of its 1/``SHARDS`` of the 16,384 slots, so a
cluster whose masters hold equal ranges of slots (what ``redis-cli --cluster create`` makes for up
to ``SHARDS`` masters) gets an equal share of the shards. A prefix that holds a hash tag of its
own (``app:{x}:``) puts every key in that one slot: allowed, but then one master does all the work.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Final, NamedTuple

THROUGHPUT_BUCKET_TTL_S: Final = 900
SHARDS: Final = 24
# Found by searching short strings for a slot in the middle of each 24th of the slot space (the
# unit tests check it); fixed from here on.
SHARD_TAGS: Final = (
    *("bd", "aa", "ap", "c6", "b5", "a0", "ba", "ad", "aq", "c7", "b4", "a1"),
    *("bb", "ag", "ar", "c4", "b3", "a2", "bc", "af", "as", "c9", "b2", "a3"),
)
HEARTBEAT_SHARD: Final = 0


def shard_of(name: str) -> int:
    """The shard of a message ID or a text hash (stable across processes and versions)."""
    return zlib.crc32(name.encode()) % SHARDS


class MessageKeys(NamedTuple):
    """The keys of one message ID, all in its shard's slot."""

    shard: int
    done: str
    claim: str
    attempts: str


@dataclass(frozen=True, slots=True)
class RedisKeys:
    """Builds the keys of one deployment (one prefix)."""

    prefix: str

    def message(self, message_id: str) -> MessageKeys:
        shard = shard_of(message_id)
        tail = f":{{{SHARD_TAGS[shard]}}}:{message_id}"
        p = self.prefix
        return MessageKeys(shard, f"{p}done{tail}", f"{p}claim{tail}", f"{p}attempts{tail}")

    def done(self, message_id: str) -> str:
        return self.message(message_id).done

    def claim(self, message_id: str) -> str:
        return self.message(message_id).claim

    def attempts(self, message_id: str) -> str:
        return self.message(message_id).attempts

    def cache(self, classifier_key: str, text_hash: str) -> str:
        tag = SHARD_TAGS[shard_of(text_hash)]
        return f"{self.prefix}cache:{{{tag}}}:{classifier_key}:{text_hash}"

    def lock(self, classifier_key: str, text_hash: str) -> str:
        """The single-flight lock next to ``cache(classifier_key, text_hash)`` (same slot)."""
        tag = SHARD_TAGS[shard_of(text_hash)]
        return f"{self.prefix}lock:{{{tag}}}:{classifier_key}:{text_hash}"

    @property
    def cache_pattern(self) -> str:
        """A ``SCAN MATCH`` pattern for every cached classification."""
        return f"{self.prefix}cache:*"

    @property
    def claim_pattern(self) -> str:
        """A ``SCAN MATCH`` pattern for every live claim."""
        return f"{self.prefix}claim:*"

    @property
    def llm_rate(self) -> str:
        return f"{self.prefix}llm:{{llm}}:rate"

    @property
    def llm_cooldown(self) -> str:
        return f"{self.prefix}llm:{{llm}}:cooldown"

    def stats(self, shard: int = HEARTBEAT_SHARD) -> str:
        """One shard of the cluster counters (``stats_shards`` lists them all)."""
        return f"{self.prefix}stats:{{{SHARD_TAGS[shard]}}}"

    @property
    def stats_shards(self) -> tuple[str, ...]:
        return tuple(self.stats(shard) for shard in range(SHARDS))

    def throughput(self, shard: int, epoch_second: int) -> str:
        """The shard's throughput hash of the minute holding ``epoch_second``."""
        return f"{self.prefix}tp:{{{SHARD_TAGS[shard]}}}:{epoch_second // 60}"

    @property
    def throughput_pattern(self) -> str:
        """A ``SCAN MATCH`` pattern for every throughput hash."""
        return f"{self.prefix}tp:*"

    def replica(self, replica_id: str) -> str:
        return f"{self.prefix}replica:{{{SHARD_TAGS[HEARTBEAT_SHARD]}}}:{replica_id}"

    @property
    def replicas(self) -> str:
        return f"{self.prefix}replicas:{{{SHARD_TAGS[HEARTBEAT_SHARD]}}}"

    @property
    def everything(self) -> str:
        """A ``SCAN MATCH`` pattern for every key of the deployment (demo and bench clean-up)."""
        return f"{self.prefix}*"

    def breaker(self, classifier_key: str) -> str:
        """The circuit breaker of one classifier identity. The identity is a hash tag, so that
        the breaker's keys (one today) stay in one Redis Cluster slot for its script."""
        return f"{self.prefix}breaker:{{{classifier_key}}}"

    @property
    def breaker_pattern(self) -> str:
        """A ``SCAN MATCH`` pattern for every classifier's breaker."""
        return f"{self.prefix}breaker:*"
