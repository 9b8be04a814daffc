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
