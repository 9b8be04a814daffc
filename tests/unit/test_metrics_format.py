"""The Prometheus exposition of a replica: conventional names, and what ``promtool`` accepts."""

from __future__ import annotations

import re
import shutil
import subprocess

from prometheus_client import CollectorRegistry, generate_latest

from worker.observability.counters import Counters, ReplicaIdentity
from worker.observability.http import ReplicaCollector, ReplicaView
from worker.observability.metrics import CounterName
from worker.redisio.keys import RedisKeys


def exposition() -> str:
    """What /metrics serves for a replica that processed three messages, queue depths known."""
    counters = Counters(cluster=False)
    counters.record(CounterName.PROCESSED, 3)
    counters.record(CounterName.DUPLICATES, 1)
    for seconds in (0.004, 0.02, 3.0):
        counters.latency.observe(seconds)
    view = ReplicaView(
        identity=ReplicaIdentity.create("unit-replica"),
        counters=counters,
        link=None,
        keys=RedisKeys("unit:"),
        in_flight=lambda: 2,
        broker_connected=lambda: True,
        consuming=lambda: True,
        classifier_tallies=lambda: {
            "llm_requests": 5,
            "llm_errors_timeout": 1,
            "rate_limit_waits": 2,
            "single_flight_cluster_waits": 3,
            "cache_local_entries": 4,
        },
    )
    collector = ReplicaCollector(view)
    collector.queue_depths = {
        "input": {"name": "in", "messages": 7, "consumers": 1},
        "dead_letter": {"name": "dead", "messages": 1, "consumers": 0},
    }
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return generate_latest(registry).decode()


def test_promtool_accepts_the_exposition() -> None:
    """``promtool check metrics`` reports no error or lint problem in the exposition."""
    promtool = shutil.which("promtool")
    assert promtool, "promtool is not installed (Debian: apt-get install prometheus)"
    done = subprocess.run(
        [promtool, "check", "metrics"],
        input=exposition().encode(),
        capture_output=True,
        timeout=30,
    )
    assert done.returncode == 0, (done.stdout + done.stderr).decode()
    assert done.stdout.strip() == b""
    assert done.stderr.strip() == b""


def test_names_follow_prometheus_conventions() -> None:
    """Every sample is prefixed ``neiromatrius_``; every counter is a ``_total``; the processing
    duration is a histogram in seconds; in-flight, Redis, broker and queue depths are gauges."""
    text = exposition()
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE))
    assert all(name.startswith("neiromatrius_") for name in types)
    for counter in CounterName:
        assert types[f"neiromatrius_{counter.value}_total"] == "counter"
    assert [n for n, t in types.items() if t == "counter" and not n.endswith("_total")] == []
    assert types["neiromatrius_processing_seconds"] == "histogram"
    for gauge in (
        "neiromatrius_in_flight",
        "neiromatrius_redis_connected",
        "neiromatrius_redis_configured",
        "neiromatrius_broker_connected",
        "neiromatrius_consuming",
        "neiromatrius_queue_messages",
    ):
        assert types[gauge] == "gauge"
    assert "neiromatrius_processed_total 3.0" in text
    assert "neiromatrius_in_flight 2.0" in text
    assert 'neiromatrius_queue_messages{queue="input"} 7.0' in text
    assert 'neiromatrius_processing_seconds_bucket{le="0.005"} 1.0' in text
    assert 'neiromatrius_processing_seconds_bucket{le="+Inf"} 3.0' in text
    assert "neiromatrius_processing_seconds_count 3.0" in text


def test_classifier_tallies_are_exported() -> None:
    """LLM calls, errors by kind, rate-limit and single-flight waits reach /metrics as counters,
    and the local cache size as a gauge."""
    text = exposition()
    assert "neiromatrius_llm_requests_total 5.0" in text
    assert "neiromatrius_llm_errors_timeout_total 1.0" in text
    assert "neiromatrius_rate_limit_waits_total 2.0" in text
    assert "neiromatrius_single_flight_cluster_waits_total 3.0" in text
    assert re.search(r"^# TYPE neiromatrius_cache_local_entries gauge$", text, re.MULTILINE)
