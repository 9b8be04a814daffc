"""The names of the counters every replica keeps, and the cluster keeps in Redis (``stats`` hash)."""

from __future__ import annotations

from enum import StrEnum


class CounterName(StrEnum):
    """Counters kept per replica and, with Redis, for the whole cluster."""

    PROCESSED = "processed"
    DUPLICATES = "duplicates"
    REDELIVERED_DONE = "redelivered_done"
    CACHE_HITS = "cache_hits"
    CACHE_MISSES = "cache_misses"
    CLASSIFIER_CALLS = "classifier_calls"
    FAILED = "failed"
    RETRIED = "retried"
    DEAD_LETTERED = "dead_lettered"
    CLAIMS_LOST = "claims_lost"
    DEGRADED = "degraded"
    CONSUMER_TIMEOUTS = "consumer_timeouts"
    BREAKER_OPENS = "breaker_opens"
    BREAKER_PROBES = "breaker_probes"
    BREAKER_HELD = "breaker_held"


# The help line of each counter in /metrics (a counter without one gets a generic line).
COUNTER_HELP: dict[str, str] = {
    CounterName.PROCESSED: "Messages processed (classified, result published) by this replica.",
    CounterName.DUPLICATES: "Deliveries skipped because their message ID was already processed.",
    CounterName.REDELIVERED_DONE: "Redeliveries of messages already processed (not counted twice).",
    CounterName.CACHE_HITS: "Processed messages whose classification came from the cache.",
    CounterName.CACHE_MISSES: "Processed messages whose classification had to be computed.",
    CounterName.CLASSIFIER_CALLS: "Calls made to the classifier.",
    CounterName.FAILED: "Processing attempts that failed (then retried or dead-lettered).",
    CounterName.RETRIED: "Messages parked in a retry queue after a transient failure.",
    CounterName.DEAD_LETTERED: "Messages sent to the dead-letter queue.",
    CounterName.CLAIMS_LOST: "Messages whose claim lapsed before completion (another replica took over).",
    CounterName.DEGRADED: "Claims made in memory because Redis was unreachable.",
    CounterName.CONSUMER_TIMEOUTS: "Consumer channels the broker closed for a delivery acknowledgement timeout.",
    CounterName.BREAKER_OPENS: "Times this replica opened the LLM circuit breaker.",
    CounterName.BREAKER_PROBES: "Probe requests this replica sent while the LLM breaker was open.",
    CounterName.BREAKER_HELD: "Messages held (no attempt spent) while the LLM breaker was open.",
}
