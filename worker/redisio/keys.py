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
{p}breaker:{classifier}       hash        circuit breaker of a classifier (fields: breaker.lua);
                                          the identity, in braces, is a hash tag; TTL 7 days

A *stem* is a key without its last part (``{p}done:``): the claim scripts receive stems and the
message IDs, and join them in Lua, so a call carries one argument per ID instead of three keys.
"""

from __future__ import annotations

from dataclasses import dataclass

THROUGHPUT_BUCKET_TTL_S = 900


@dataclass(frozen=True, slots=True)
class RedisKeys:
    """Builds the keys of one deployment (one prefix)."""

    prefix: str

    @property
    def done_stem(self) -> str:
        return f"{self.prefix}done:"

    @property
    def claim_stem(self) -> str:
        return f"{self.prefix}claim:"

    @property
    def attempts_stem(self) -> str:
        return f"{self.prefix}attempts:"

    @property
    def throughput_stem(self) -> str:
        """The throughput buckets' stem: scripts append the Redis clock's second to it."""
        return f"{self.prefix}tp:"

    def done(self, message_id: str) -> str:
        return self.done_stem + message_id

    def claim(self, message_id: str) -> str:
        return self.claim_stem + message_id

    def attempts(self, message_id: str) -> str:
        return self.attempts_stem + message_id

    def cache(self, classifier_key: str, text_hash: str) -> str:
        return f"{self.prefix}cache:{classifier_key}:{text_hash}"

    @property
    def cache_pattern(self) -> str:
        """A ``SCAN MATCH`` pattern for every cached classification."""
        return f"{self.prefix}cache:*"

    @property
    def claim_pattern(self) -> str:
        """A ``SCAN MATCH`` pattern for every live claim."""
        return f"{self.claim_stem}*"

    def lock(self, classifier_key: str, text_hash: str) -> str:
        """The single-flight lock next to ``cache(classifier_key, text_hash)``."""
        return f"{self.prefix}lock:{classifier_key}:{text_hash}"

    @property
    def llm_rate(self) -> str:
        return f"{self.prefix}llm:rate"

    @property
    def llm_cooldown(self) -> str:
        return f"{self.prefix}llm:cooldown"

    @property
    def stats(self) -> str:
        return f"{self.prefix}stats"

    def throughput(self, epoch_second: int) -> str:
        return f"{self.throughput_stem}{epoch_second}"

    @property
    def throughput_pattern(self) -> str:
        """A ``SCAN MATCH`` pattern for every throughput bucket."""
        return f"{self.throughput_stem}*"

    def replica(self, replica_id: str) -> str:
        return f"{self.prefix}replica:{replica_id}"

    @property
    def replicas(self) -> str:
        return f"{self.prefix}replicas"

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
