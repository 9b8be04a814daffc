"""Prometheus families of what ``/metrics`` reads at scrape time: queue depths and Redis ``INFO``.

A collector's ``collect`` cannot await, so the ``/metrics`` handler asks the broker and Redis first
and hands the documents (the same ones the stats JSON shows) to these functions. Both are the same
from every replica: take ``max`` in PromQL.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from worker.observability.metrics import COUNTER_HELP, CounterName
from worker.observability.stats import read_redis_memory
from worker.redisio.link import REDIS_ERRORS, RedisLink

# (metric name, field of the stats' ``redis`` section, help) for the gauges.
REDIS_GAUGES: tuple[tuple[str, str, str], ...] = (
    ("neiromatrius_redis_used_memory_bytes", "used_memory", "Memory Redis uses, in bytes."),
    ("neiromatrius_redis_maxmemory_bytes", "maxmemory", "Redis maxmemory in bytes (0: no limit)."),
    (
        "neiromatrius_redis_connected_clients",
        "connected_clients",
        "Client connections Redis has open (every replica's included).",
    ),
    (
        "neiromatrius_redis_ops_per_second",
        "instantaneous_ops_per_sec",
        "Commands per second Redis executes (its instantaneous_ops_per_sec).",
    ),
)


GAUGE_TALLIES = frozenset({"cache_local_entries"})


def gauge(name: str, documentation: str, value: float | bool) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation)
    family.add_metric([], float(value))
    return family


def queue_depth_metric(queue_depths: dict[str, Any]) -> Metric:
    depth = GaugeMetricFamily(
        "neiromatrius_queue_messages",
        "Messages waiting in the queue (the same for every replica: use max).",
        labels=["queue"],
    )
    for role in ("input", "dead_letter", "unrouted"):
        messages = queue_depths.get(role, {}).get("messages")
        if messages is not None:
            depth.add_metric([role], float(messages))
    return depth


def results_unrouted(queue_depths: dict[str, Any] | None) -> int | None:
    """Results kept in ``{RESULTS_EXCHANGE}.unrouted`` now (no binding took them); ``None``
    when unknown (the broker not asked, or ``RESULTS_UNROUTED=discard``)."""
    messages = ((queue_depths or {}).get("unrouted") or {}).get("messages")
    return messages if isinstance(messages, int) else None


def unrouted_metric(queue_depths: dict[str, Any]) -> Iterator[Metric]:
    if (count := results_unrouted(queue_depths)) is not None:
        yield gauge(
            "neiromatrius_results_unrouted",
            "Results no binding took, kept in {RESULTS_EXCHANGE}.unrouted (the same for every "
            "replica: use max).",
            count,
        )


def redis_metrics(redis: dict[str, Any]) -> Iterator[Metric]:
    """Memory, connections, commands per second and evictions of the stats' ``redis`` section."""
    for name, field, documentation in REDIS_GAUGES:
        if isinstance(redis.get(field), int | float):
            yield gauge(name, documentation, redis[field])
    evicted = CounterMetricFamily(
        "neiromatrius_redis_evicted_keys", "Keys Redis evicted to stay under maxmemory."
    )
    evicted.add_metric([], float(redis.get("evicted_keys") or 0))
    yield evicted


async def scrape_redis(link: RedisLink | None) -> dict[str, Any] | None:
    """The stats' ``redis`` section now, or ``None`` without a reachable Redis."""
    if link is None or not link.available:
        return None
    try:
        return await read_redis_memory(link.client)
    except REDIS_ERRORS as exc:
        link.report_aside(exc)
        return None


def breaker_metrics(breaker: dict[str, Any] | None) -> Iterator[Metric]:
    """The LLM circuit breaker's state, as this replica last read it (nothing without one)."""
    if breaker is None:
        return
    yield gauge(
        "neiromatrius_llm_breaker_open",
        "1 while the LLM circuit breaker is open (cache misses wait, hits flow).",
        breaker["state"] == "open",
    )
    yield gauge(
        "neiromatrius_llm_breaker_configuration_error",
        "1 while the LLM breaker is open because the server refuses the configuration.",
        breaker["kind"] == "configuration",
    )


def counter_metrics(local: Mapping[str, int]) -> Iterator[Metric]:
    """This replica's counters, one family each."""
    for counter in CounterName:
        # The family name has no suffix: the exposition adds ``_total`` to counters.
        family = CounterMetricFamily(
            f"neiromatrius_{counter.value}",
            COUNTER_HELP.get(counter, f"Events counted as {counter.value} by this replica."),
        )
        family.add_metric([], float(local[counter]))
        yield family


def classifier_metrics(tallies: Mapping[str, int]) -> Iterator[Metric]:
    """The classifier's tallies: gauges for the sizes, counters for the rest."""
    for name, value in sorted(tallies.items()):
        # Tallies of the cache tiers, single flights, rate limiter and LLM client.
        if name in GAUGE_TALLIES:
            yield gauge(f"neiromatrius_{name}", f"Classifier state: {name}.", value)
        else:
            family = CounterMetricFamily(
                f"neiromatrius_{name}", f"Classifier events counted as {name} by this replica."
            )
            family.add_metric([], float(value))
            yield family
