"""The monitoring HTTP server of a replica: stats JSON, liveness, readiness, Prometheus metrics.

- ``GET /api/monitoring/stats``: the cluster view from Redis (``scope: cluster``), or this
  replica's own numbers without a reachable Redis (``scope: instance``), plus queue depths and
  this replica's own counters under ``replica``.
- ``GET /health/live``: 200 while the process serves HTTP.
- ``GET /health/ready``: 200 while connected to the broker and consuming, else 503 with the reason.
- ``GET /metrics``: this replica's counters, in-flight, Redis/broker state, queue depths and Redis
  ``INFO`` figures in the Prometheus text format. Counters are per replica (sum them in PromQL);
  queue depths and Redis figures are the same from every replica (take ``max``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson
import structlog
from aio_pika.abc import AbstractConnection
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from worker import __version__
from worker.core.errors import ConfigError
from worker.observability.counters import Counters, ReplicaIdentity
from worker.observability.exposition import (
    breaker_metrics,
    gauge,
    queue_depth_metric,
    redis_metrics,
    results_unrouted,
    scrape_redis,
    unrouted_metric,
)
from worker.observability.metrics import COUNTER_HELP, CounterName
from worker.observability.stats import (
    BROKER_UNREACHABLE,
    QUEUE_PROBE_ERRORS,
    WINDOWS_S,
    QueueNames,
    rates,
    read_cluster,
    read_queue_depths,
    replica_entry,
    unknown_depths,
)
from worker.redisio.keys import RedisKeys
from worker.redisio.link import REDIS_UNAVAILABLE, RedisLink

log = structlog.get_logger("worker.observability.http")

# What ``generate_latest`` writes (newer prometheus_client versions advertise 1.0.0 by default).
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


GAUGE_TALLIES = frozenset({"cache_local_entries"})


@dataclass(slots=True)
class ReplicaView:
    """What the endpoints report about this replica; the callables read live state."""

    identity: ReplicaIdentity
    counters: Counters
    link: RedisLink | None
    keys: RedisKeys
    in_flight: Callable[[], int]
    broker_connected: Callable[[], bool]
    consuming: Callable[[], bool]
    queue_names: QueueNames | None = None
    connection: Callable[[], AbstractConnection | None] = lambda: None
    classifier_tallies: Callable[[], dict[str, int]] = dict
    broker_problem: Callable[[], str | None] = lambda: None  # why not connected, when known
    classifier_problem: Callable[[], str | None] = lambda: None  # why the classifier is paused
    breaker: Callable[[], dict[str, Any] | None] = lambda: None  # the classifier's breaker

    def cache_status(self) -> dict[str, str]:
        if self.link is None:
            return {"status": "memory", "type": "memory"}
        return {"status": self.link.state.value, "type": "redis"}

    def replica(self) -> dict[str, Any]:
        return {
            "id": self.identity.replica_id,
            "host": self.identity.host,
            "pid": self.identity.pid,
            "started_at": self.identity.started_at,
            "in_flight": self.in_flight(),
            "counters": self.counters.snapshot(),
            "classifier": self.classifier_tallies(),
            "breaker": self.breaker(),
            "throughput": {f"{w}s": round(self.counters.throughput(w), 2) for w in WINDOWS_S},
        }

    async def queues(self) -> dict[str, Any] | None:
        """Depths of the input and dead-letter queues, asked of the broker now."""
        if self.queue_names is None:
            return None
        connection = self.connection()
        if connection is None or not self.broker_connected():
            return unknown_depths(self.queue_names, BROKER_UNREACHABLE)
        try:
            return await read_queue_depths(connection, self.queue_names)
        except QUEUE_PROBE_ERRORS:
            return unknown_depths(self.queue_names, BROKER_UNREACHABLE)

    async def snapshot(self) -> dict[str, Any]:
        """The stats document: the cluster's numbers when Redis answers, else this replica's."""
        replica = self.replica()
        cache = self.cache_status()
        queues = await self.queues()
        if self.link is not None and self.link.available:
            try:
                cluster = await read_cluster(self.link.client, self.keys)
                cluster["results_unrouted"] = results_unrouted(queues)
                return {"cache": cache, **cluster, "queues": queues, "replica": replica}
            except REDIS_UNAVAILABLE as exc:
                self.link.report_failure(exc)
                cache = self.cache_status()
        counters = replica["counters"]
        own = {**replica, "last_seen": time.time(), "processed": counters[CounterName.PROCESSED]}
        return {
            "cache": cache,
            "scope": "instance",
            "counters": counters,
            "rates": rates(counters),
            "throughput": replica["throughput"],
            "replicas": [replica_entry(own)],
            "redis": None,
            "breakers": [] if replica["breaker"] is None else [replica["breaker"]],
            "queues": queues,
            "results_unrouted": results_unrouted(queues),
            "replica": replica,
        }

    def readiness(self) -> tuple[bool, str]:
        if not self.broker_connected():
            return False, self.broker_problem() or BROKER_UNREACHABLE
        if not self.consuming():
            return False, "the consumer is not running"
        if (paused := self.classifier_problem()) is not None:
            return False, paused
        return True, "consuming"


class ReplicaCollector(Collector):
    """Prometheus metrics computed at scrape time from the replica's counters (nothing per message).

    Queue depths and Redis ``INFO`` need I/O, which ``collect`` cannot await: the ``/metrics``
    handler reads them first and leaves them in ``queue_depths`` and ``redis``.
    """

    def __init__(self, view: ReplicaView) -> None:
        self._view = view
        self.queue_depths: dict[str, Any] | None = None
        self.redis: dict[str, Any] | None = None

    def collect(self) -> Iterator[Metric]:
        view = self._view
        info = GaugeMetricFamily(
            "neiromatrius_replica_info",
            "Always 1; the labels identify this replica.",
            labels=["replica", "version"],
        )
        info.add_metric([view.identity.replica_id, __version__], 1.0)
        yield info
        yield from _counter_metrics(view)
        yield view.counters.latency.metric(
            "neiromatrius_processing_seconds",
            # Measured per pass, from the start of work on its claimed messages to their
            # completion in the claim store: waiting in the inbox and claiming are not in it.
            "Time from the start of work on a claimed message to its completion, in seconds.",
        )
        yield from _classifier_metrics(view)
        yield from _state_gauges(view)
        if self.queue_depths is not None:
            yield queue_depth_metric(self.queue_depths)
            yield from unrouted_metric(self.queue_depths)
        if self.redis is not None:
            yield from redis_metrics(self.redis)


def _counter_metrics(view: ReplicaView) -> Iterator[Metric]:
    local = view.counters.local
    for counter in CounterName:
        # The family name has no suffix: the exposition adds ``_total`` to counters.
        family = CounterMetricFamily(
            f"neiromatrius_{counter.value}",
            COUNTER_HELP.get(counter, f"Events counted as {counter.value} by this replica."),
        )
        family.add_metric([], float(local[counter]))
        yield family


def _classifier_metrics(view: ReplicaView) -> Iterator[Metric]:
    for name, value in sorted(view.classifier_tallies().items()):
        # Tallies of the cache tiers, single flights, rate limiter and LLM client.
        if name in GAUGE_TALLIES:
            yield gauge(f"neiromatrius_{name}", f"Classifier state: {name}.", value)
        else:
            family = CounterMetricFamily(
                f"neiromatrius_{name}", f"Classifier events counted as {name} by this replica."
            )
            family.add_metric([], float(value))
            yield family


def _state_gauges(view: ReplicaView) -> Iterator[Metric]:
    yield gauge("neiromatrius_in_flight", "Deliveries being handled now.", view.in_flight())
    yield gauge(
        "neiromatrius_redis_configured",
        "1 when REDIS_URL is set (cluster mode), 0 in in-memory mode.",
        view.link is not None,
    )
    yield gauge(
        "neiromatrius_redis_connected",
        "1 when Redis is configured and reachable.",
        view.link is not None and view.link.available,
    )
    yield gauge(
        "neiromatrius_broker_connected",
        "1 when RabbitMQ is reachable.",
        view.broker_connected(),
    )
    yield gauge("neiromatrius_consuming", "1 while the consumer is running.", view.consuming())
    yield from breaker_metrics(view.breaker())


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def build_app(view: ReplicaView) -> web.Application:
    registry = CollectorRegistry(auto_describe=False)
    collector = ReplicaCollector(view)
    registry.register(collector)
    ProcessCollector(registry=registry)

    async def stats(_: web.Request) -> web.Response:
        return _json(await view.snapshot())

    async def live(_: web.Request) -> web.Response:
        return _json({"status": "alive", "replica": view.identity.replica_id})

    async def ready(_: web.Request) -> web.Response:
        ok, why = view.readiness()
        return _json({"status": "ready" if ok else "not_ready", "reason": why}, 200 if ok else 503)

    async def metrics(_: web.Request) -> web.Response:
        collector.queue_depths = await view.queues()
        collector.redis = await scrape_redis(view.link)
        return web.Response(body=generate_latest(registry), headers={"Content-Type": METRICS_TYPE})

    app = web.Application()
    app.router.add_get("/api/monitoring/stats", stats)
    app.router.add_get("/health/live", live)
    app.router.add_get("/health/ready", ready)
    app.router.add_get("/metrics", metrics)
    return app


class MonitorServer:
    """Serves ``build_app`` on ``host:port`` for the life of the replica (port 0 picks a free one)."""

    def __init__(self, view: ReplicaView, host: str, port: int) -> None:
        self._runner = web.AppRunner(build_app(view), access_log=None, handle_signals=False)
        self._host = host
        self._port = port
        self.port: int | None = None

    async def __aenter__(self) -> MonitorServer:
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        try:
            await site.start()
        except OSError as exc:  # most often: another replica on this host has the port
            await self._runner.cleanup()
            raise ConfigError(
                f"STATS_PORT={self._port}: cannot listen on {self._host}:{self._port} "
                f"({os.strerror(exc.errno) if exc.errno else exc}); another replica on this "
                "host? Set STATS_PORT=0 for any free port, or another port"
            ) from None
        server = site._server  # aiohttp exposes the bound sockets only here
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else self._port
        log.info("monitoring_listening", host=self._host, port=self.port)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._runner.cleanup()
