"""The Redis key layout, in one place. Every key starts with ``REDIS_KEY_PREFIX``.

{p}done:{message_id}          "1"         processed marker, TTL = DEDUP_TTL_S
{p}claim:{message_id}         token       lease of the replica working on it, TTL = lease
{p}attempts:{message_id}      integer     attempts started (raised at claim time), TTL = DEDUP_TTL_S,
                                          deleted when the message is done
{p}cache:{classifier}:{hash}  JSON        classification of a normalised text, TTL = CACHE_TTL_S
{p}lock:{classifier}:{hash}   token       single-flight lock of the replica classifying that text
{p}llm:rate                   timestamp   GCRA pacing of LLM calls for the whole cluster
{p}llm:cooldown               timestamp   set by a 429: every replica waits until then
{p}stats                      hash        cluster counters (field names: ``CounterName``)
{p}tp:{epoch_second}          integer     messages processed in that second, TTL 15 min
{p}replica:{replica_id}       JSON        heartbeat of a live replica, TTL 3 heartbeats
{p}replicas                   set         replica IDs that have sent a heartbeat
"""

from __future__ import annotations

from dataclasses import dataclass

THROUGHPUT_BUCKET_TTL_S = 900


@dataclass(frozen=True, slots=True)
class RedisKeys:
    """Builds the keys of one deployment (one prefix)."""

    prefix: str

    def done(self, message_id: str) -> str:
        return f"{self.prefix}done:{message_id}"

    def claim(self, message_id: str) -> str:
        return f"{self.prefix}claim:{message_id}"

    def attempts(self, message_id: str) -> str:
        return f"{self.prefix}attempts:{message_id}"

    def cache(self, classifier_key: str, text_hash: str) -> str:
        return f"{self.prefix}cache:{classifier_key}:{text_hash}"

    @property
    def stats(self) -> str:
        return f"{self.prefix}stats"

    def throughput(self, epoch_second: int) -> str:
        return f"{self.prefix}tp:{epoch_second}"

    def replica(self, replica_id: str) -> str:
        return f"{self.prefix}replica:{replica_id}"

    @property
    def replicas(self) -> str:
        return f"{self.prefix}replicas"
