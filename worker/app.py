"""The composition root: builds every component of a replica from ``Settings`` and runs it.

Start-up: Redis (optional), the monitoring server, the broker (retried until reachable), the
topology, then consuming. Shutdown: stop consuming, drain messages in progress within
``DRAIN_TIMEOUT_S``, send the last acknowledgements, flush counters, close the broker, then Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
from contextlib import AsyncExitStack
from dataclasses import dataclass, field

import structlog

from worker.amqp import fastpath
from worker.amqp.acks import Acker
from worker.amqp.broker import CONNECTION_NAME, Broker, Topology
from worker.amqp.connection import BrokerStatus, connect_until_stopped
from worker.amqp.timeouts import ConsumerTimeouts
from worker.amqp.unrouted import UnroutedWatch
from worker.claims.factory import build_claim_store
from worker.claims.leases import LeaseKeeper
from worker.claims.protocol import ClaimStore
from worker.classification.breaker import CircuitBreaker
from worker.classification.cache import ClassificationCache, LocalCache
from worker.classification.cached import CachedClassifier
from worker.classification.classifiers.base import Classifier
from worker.classification.classifiers.factory import breaker_of, build_classifier
from worker.classification.locks import LOCK_TTL_S, ClusterLocks
from worker.classification.singleflight import ClusterFlight
from worker.core.gc_tuning import tune_for_throughput
from worker.core.settings import Settings
from worker.observability.counters import ClusterReporter, Counters, ReplicaIdentity, log_progress
from worker.observability.http import MonitorServer, ReplicaView
from worker.observability.stats import QueueNames
from worker.observability.tasks import BackgroundErrors
from worker.processing.claiming import Claimer
from worker.processing.failures import Failures
from worker.processing.hooks import Hooks
from worker.processing.inbox import ConsumerLimits, MessageConsumer
from worker.processing.pipeline import Pipeline
from worker.processing.stopping import Stopping
from worker.processing.traced import pipeline_hooks
from worker.redisio.keys import RedisKeys
from worker.redisio.link import RedisLink
from worker.redisio.roles import cache_link, claims_link, connect_links

log = structlog.get_logger("worker.app")

SUMMARY_INTERVAL_S = 30.0


@dataclass(slots=True)
class _Live:
    """Mutable facts the monitoring endpoints read while the replica starts, runs and stops."""

    consumer: MessageConsumer | None = None
    broker: Broker | None = None
    consuming: bool = False
    broker_status: BrokerStatus = field(default_factory=BrokerStatus)

    def in_flight(self) -> int:
        return self.consumer.in_flight if self.consumer else 0

    def waiting_for_redis(self, strict: bool, link: RedisLink | None) -> bool:
        """Whether messages wait for Redis now: claims on hold, or strict mode while it is away."""
        if self.consumer is not None and self.consumer.paused:
            return True
        return strict and link is not None and not link.available


@dataclass(frozen=True, slots=True)
class _Base:
    """What every part of a replica is built from."""

    settings: Settings
    identity: ReplicaIdentity
    keys: RedisKeys
    counters: Counters
    background_errors: BackgroundErrors
    link: RedisLink | None
    cache_link: RedisLink | None  # the cache's: ``link`` itself without REDIS_CACHE_URL
    live: _Live
    classifier: Classifier
    breaker: CircuitBreaker | None  # the classifier's, if it has one
    hooks: Hooks


async def build_cached_classifier(stack: AsyncExitStack, base: _Base) -> CachedClassifier:
    """The classifier behind its two cache tiers and, with Redis, the cluster's single flight."""
    settings, link, classifier = base.settings, base.cache_link, base.classifier
    cache = ClassificationCache(
        LocalCache(settings.local_cache_size),
        link=link,
        keys=base.keys,
        identity=classifier.identity,
        ttl_s=settings.cache_ttl_s,
    )
    stack.push_async_callback(cache.aclose)
    flight = None
    if link is not None:
        # A dead owner's lock lapses no later than its claims do.
        locks = ClusterLocks(link, ttl_s=min(LOCK_TTL_S, settings.claim_lease_s))
        flight = ClusterFlight(locks, wait_s=settings.single_flight_wait_s)
    cached = CachedClassifier(classifier, cache, base.counters, flight=flight)
    stack.push_async_callback(cached.aclose)
    return cached


async def start_monitoring(stack: AsyncExitStack, base: _Base, cached: CachedClassifier) -> None:
    """The monitoring server and, with Redis, the heartbeats and the counters' flushes."""
    settings, link, live = base.settings, base.link, base.live
    strict = settings.redis_failure_mode == "strict"
    view = ReplicaView(
        identity=base.identity,
        counters=base.counters,
        link=link,
        keys=base.keys,
        in_flight=live.in_flight,
        broker_connected=lambda: live.broker is not None and live.broker.connected,
        consuming=lambda: live.consuming and not live.waiting_for_redis(strict, link),
        queue_names=QueueNames.of(settings),
        classifier_tallies=cached.snapshot,
        connection=lambda: live.broker.connection if live.broker else None,
        broker_problem=live.broker_status.reason,
        cache_link=base.cache_link if base.cache_link is not link else None,
        classifier_problem=base.breaker.problem if base.breaker else lambda: None,
        breaker=base.breaker.state if base.breaker else lambda: None,
        background_errors=base.background_errors,
        secrets=settings.secrets,
    )
    await stack.enter_async_context(MonitorServer(view, settings.stats_host, settings.stats_port))
    if link is not None:
        reporter = ClusterReporter(
            link,
            base.keys,
            base.counters,
            base.identity,
            lambda: {"in_flight": live.in_flight()},
            interval_s=settings.heartbeat_interval_s,
            errors=base.background_errors,
        )
        await stack.enter_async_context(reporter)


async def build_broker(stack: AsyncExitStack, base: _Base, stop: asyncio.Event) -> Broker | None:
    """The broker connection (retried until reachable) and the declared topology."""
    settings = base.settings
    name = f"{CONNECTION_NAME}/{base.identity.replica_id}"
    connection = await connect_until_stopped(
        settings.rabbitmq_url,
        stop,
        name=name,
        secrets=settings.secrets,
        status=base.live.broker_status,
    )
    if connection is None:
        return None
    stack.push_async_callback(connection.close)
    broker = Broker(connection, Topology.of(settings), app_id=base.identity.replica_id)
    await broker.declare()
    if broker.topology.keep_unrouted:
        await stack.enter_async_context(UnroutedWatch(connection, broker.topology.unrouted))
    return broker


def build_failures(base: _Base, broker: Broker, claims: ClaimStore, stop: Stopping) -> Failures:
    """Retries, dead letters, and the hold of messages while the classifier's breaker is open."""
    return Failures(
        outbox=broker,
        claims=claims,
        counters=base.counters,
        max_attempts=base.settings.max_attempts,
        stopping=stop,
        retry_delay_ms=broker.topology.retry_delay_ms,
        paused=base.breaker.is_open if base.breaker else lambda: False,
        hold_s=base.settings.llm_breaker_hold_s,
    )


def build_consumer(
    base: _Base,
    *,
    broker: Broker,
    claims: ClaimStore,
    leases: LeaseKeeper,
    classifier: CachedClassifier,
    acker: Acker,
) -> MessageConsumer:
    """The inbox, its claimer and its pipeline, with the failures' handling they share."""
    settings, counters = base.settings, base.counters
    stopping = Stopping()
    failures = build_failures(base, broker, claims, stopping)
    pipeline = Pipeline(
        outbox=broker,
        claims=claims,
        leases=leases,
        classifier=classifier,
        failures=failures,
        counters=counters,
        hooks=base.hooks,
    )
    limits = ConsumerLimits(settings.max_message_bytes, settings.max_attempts, settings.prefetch)
    return MessageConsumer(
        limits=limits,
        claimer=Claimer(claims, stopping),
        pipeline=pipeline,
        failures=failures,
        acker=acker,
        counters=counters,
        stopping=stopping,
    )


async def consume_until_stopped(
    base: _Base, broker: Broker, consumer: MessageConsumer, acker: Acker, stop: asyncio.Event
) -> bool:
    """Consume until ``stop`` is set, then stop consuming and drain; ``True`` if in time."""
    settings, counters, live = base.settings, base.counters, base.live
    tune_for_throughput()  # start-up is done (see worker.core.gc_tuning)
    timeouts = ConsumerTimeouts(counters, settings.rabbitmq_consumer_timeout_s)
    consuming = await broker.consume(settings.prefetch, consumer.on_delivery, timeouts=timeouts)
    live.consuming = True
    summaries = asyncio.get_running_loop().create_task(
        log_progress(counters, live.in_flight, SUMMARY_INTERVAL_S)
    )
    log.info(
        "replica_started",
        replica=base.identity.replica_id,
        queue=settings.input_queue,
        prefetch=settings.prefetch,
        classifier=base.classifier.identity,
        redis="configured" if base.link else "none",
        inline_deliveries=consuming.inline,
    )
    await stop.wait()
    log.info("replica_stopping", in_flight=consumer.in_flight)
    live.consuming = False
    summaries.cancel()
    with contextlib.suppress(Exception):
        await consuming.cancel()
    drained = await consumer.drain(settings.drain_timeout_s)
    await acker.drain()
    log.info("replica_stopped", drained=drained, **counters.snapshot())
    return drained


async def build_base(settings: Settings) -> _Base:
    """Built first, so a bad setting stops start-up before any connection but Redis's mode probe."""
    identity = ReplicaIdentity.create(settings.replica_id)
    link = await claims_link(settings)
    counters = Counters(cluster=settings.redis_enabled)
    classifier = build_classifier(settings, link=link, counters=counters)
    return _Base(
        settings=settings,
        identity=identity,
        hooks=pipeline_hooks(settings, replica_id=identity.replica_id),
        keys=RedisKeys(settings.redis_key_prefix),
        counters=counters,
        background_errors=BackgroundErrors(settings.secrets),
        link=link,
        cache_link=await cache_link(settings, link),
        live=_Live(),
        classifier=classifier,
        breaker=breaker_of(classifier),
    )


async def run_replica(settings: Settings, stop: asyncio.Event) -> bool:
    """Run one replica until ``stop`` is set; ``True`` if it drained everything in time."""
    base = await build_base(settings)
    fastpath.install(settings.amqp_fast_path)  # the only place aiormq is patched
    async with AsyncExitStack() as stack:
        stack.push_async_callback(base.classifier.aclose)
        await connect_links(stack, base.link, base.cache_link)
        if base.breaker is not None:
            base.breaker.start()  # stopped by the classifier's aclose
        claims = build_claim_store(
            settings, base.link, base.keys, base.counters, replica_id=base.identity.replica_id
        )
        stack.push_async_callback(claims.aclose)
        cached = await build_cached_classifier(stack, base)
        await start_monitoring(stack, base, cached)
        broker = base.live.broker = await build_broker(stack, base, stop)
        if broker is None:
            return True
        leases = LeaseKeeper(
            claims,
            lease_s=settings.claim_lease_s,
            work_timeout_s=settings.work_timeout_s,
            errors=base.background_errors,
        )
        await stack.enter_async_context(leases)
        acker = Acker()
        consumer = base.live.consumer = build_consumer(
            base, broker=broker, claims=claims, leases=leases, classifier=cached, acker=acker
        )
        return await consume_until_stopped(base, broker, consumer, acker, stop)
