"""The monitoring HTTP server of a replica: stats JSON, liveness, readiness, Prometheus metrics."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson
import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from worker.counters import Counters, ReplicaIdentity
from worker.keys import Counter, RedisKeys
from worker.redis_link import REDIS_UNAVAILABLE, RedisLink
from worker.stats import WINDOWS_S, rates, read_cluster

log = structlog.get_logger("worker.monitor")


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
            "throughput": {f"{w}s": round(self.counters.throughput(w), 2) for w in WINDOWS_S},
        }

    async def snapshot(self) -> dict[str, Any]:
        replica = self.replica()
        base: dict[str, Any] = {"cache": self.cache_status(), "replica": replica}
        if self.link is not None and self.link.available:
            try:
                return {**base, **await read_cluster(self.link.client, self.keys)}
            except REDIS_UNAVAILABLE as exc:
                self.link.report_failure(exc)
                base["cache"] = self.cache_status()
        return {
            **base,
            "scope": "instance",
            "counters": replica["counters"],
            "rates": rates(replica["counters"]),
            "throughput": replica["throughput"],
            "replicas": [{k: v for k, v in replica.items() if k != "counters"}],
        }

    def readiness(self) -> tuple[bool, str]:
        if not self.broker_connected():
            return False, "the broker is unreachable"
        if not self.consuming():
            return False, "the consumer is not running"
        return True, "consuming"


class ReplicaCollector(Collector):
    """Prometheus metrics computed at scrape time from the replica's counters (nothing per message)."""

    def __init__(self, view: ReplicaView) -> None:
        self._view = view

    def collect(self) -> Iterator[Metric]:
        local = self._view.counters.local
        for counter in Counter:
            family = CounterMetricFamily(
                f"neiromatrius_{counter.value}",
                f"Messages counted as {counter.value} by this replica.",
            )
            family.add_metric([], float(local[counter]))
            yield family
        in_flight = GaugeMetricFamily("neiromatrius_in_flight", "Deliveries being handled now.")
        in_flight.add_metric([], float(self._view.in_flight()))
        yield in_flight
        redis_up = GaugeMetricFamily(
            "neiromatrius_redis_connected", "1 when Redis is configured and reachable."
        )
        redis_up.add_metric(
            [], 1.0 if self._view.link is not None and self._view.link.available else 0.0
        )
        yield redis_up
        broker_up = GaugeMetricFamily(
            "neiromatrius_broker_connected", "1 when RabbitMQ is reachable."
        )
        broker_up.add_metric([], 1.0 if self._view.broker_connected() else 0.0)
        yield broker_up
        yield self._view.counters.latency.metric(
            "neiromatrius_processing_seconds",
            "Time from delivery to completion of a processed message.",
        )


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def build_app(view: ReplicaView) -> web.Application:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ReplicaCollector(view))

    async def stats(_: web.Request) -> web.Response:
        return _json(await view.snapshot())

    async def live(_: web.Request) -> web.Response:
        return _json({"status": "alive", "replica": view.identity.replica_id})

    async def ready(_: web.Request) -> web.Response:
        ok, why = view.readiness()
        return _json({"status": "ready" if ok else "not_ready", "reason": why}, 200 if ok else 503)

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(registry),
            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
        )

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
        await site.start()
        server = site._server  # aiohttp exposes the bound sockets only here
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else self._port
        log.info("monitoring_listening", host=self._host, port=self.port)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._runner.cleanup()
