"""A replica's processing layer without servers: the memory claim store, the keyword classifier,
a recording channel for acknowledgements and a recording outbox for what would be published."""

from __future__ import annotations

import asyncio
import itertools
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiormq.abc import DeliveredMessage
from pamqp import commands as spec
from pamqp.header import ContentHeader

from worker.amqp.acks import Acker
from worker.amqp.delivery import Delivery
from worker.claims.leases import LeaseKeeper
from worker.claims.memory_store import MemoryClaimStore
from worker.claims.protocol import TokenSource
from worker.classification.cache import ClassificationCache, LocalCache
from worker.classification.cached import CachedClassifier
from worker.classification.classifiers.base import Classifier
from worker.classification.classifiers.keywords import KeywordClassifier
from worker.core.classification import Classification
from worker.core.models import ChatMessage
from worker.observability.counters import Counters
from worker.processing.claiming import Claimer
from worker.processing.failures import Failures
from worker.processing.hooks import Hooks
from worker.processing.inbox import ConsumerLimits, MessageConsumer
from worker.processing.pipeline import Pipeline
from worker.processing.stopping import Stopping
from worker.redisio.keys import RedisKeys


class QuickStopping(Stopping):
    """Pauses of at most 10 ms: the tests need the paths a pause leads to, not its length."""

    async def pause(self, seconds: float) -> bool:
        return await super().pause(min(seconds, 0.01))


class RecordingChannel:
    """The acknowledgements a channel is sent, per delivery tag (``multiple`` expanded)."""

    def __init__(self) -> None:
        self.is_closed = False
        self.delivered: list[int] = []
        self.settlements: dict[int, list[str]] = defaultdict(list)
        self.changed = asyncio.Event()

    def _record(self, tag: int, what: str) -> None:
        self.settlements[tag].append(what)
        self.changed.set()

    async def basic_ack(self, delivery_tag: int, multiple: bool = False, wait: bool = True) -> None:
        if not multiple:
            self._record(delivery_tag, "ack")
            return
        for tag in self.delivered:
            if tag <= delivery_tag and not self.settlements.get(tag):
                self._record(tag, "ack")

    async def basic_nack(
        self, delivery_tag: int, multiple: bool = False, requeue: bool = True, wait: bool = True
    ) -> None:
        self._record(delivery_tag, "requeue" if requeue else "reject")

    def outcome(self, tag: int) -> str:
        return self.settlements[tag][0]

    async def wait_settled(self, count: int, timeout_s: float = 3.0) -> None:
        """Until ``count`` deliveries have been settled at least once."""
        async with asyncio.timeout(timeout_s):
            while sum(1 for tag in self.delivered if self.settlements.get(tag)) < count:
                self.changed.clear()
                await self.changed.wait()


@dataclass
class RecordingOutbox:
    """Results, retries and dead letters as they would be published (always confirmed)."""

    results: list[tuple[str, Classification, bool]] = field(default_factory=list)
    retries: list[tuple[int, int, str]] = field(default_factory=list)
    dead_letters: list[tuple[int, str, str, int]] = field(default_factory=list)
    sent_to_back: list[int] = field(default_factory=list)

    def queue_result(
        self, message: ChatMessage, classification: Classification, cached: bool, headers=None
    ) -> asyncio.Future[object]:
        self.results.append((message.message_id, classification, cached))
        confirmed: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        confirmed.set_result(None)
        return confirmed

    async def dead_letter(
        self, delivery: Delivery, reason: str, detail: str, attempts: int
    ) -> None:
        self.dead_letters.append((delivery.delivery_tag, reason, detail, attempts))

    async def schedule_retry(self, delivery: Delivery, attempt: int, error: str) -> None:
        self.retries.append((delivery.delivery_tag, attempt, error))

    async def send_to_back(self, delivery: Delivery) -> None:
        self.sent_to_back.append(delivery.delivery_tag)

    def result_ids(self) -> list[str]:
        return [message_id for message_id, _, _ in self.results]


@dataclass
class Rig:
    consumer: MessageConsumer
    channel: RecordingChannel
    outbox: RecordingOutbox
    store: MemoryClaimStore
    counters: Counters
    tags: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def deliver(
        self,
        body: Mapping[str, Any] | bytes,
        *,
        redelivered: bool = False,
        headers: Mapping[str, Any] | None = None,
    ) -> int:
        """Hand one delivery to the consumer, as the channel's reader does; its tag."""
        tag = next(self.tags)
        raw = body if isinstance(body, bytes) else orjson.dumps(body)
        properties = spec.Basic.Properties(headers=dict(headers) if headers else None)
        self.channel.delivered.append(tag)
        self.consumer.on_delivery(
            Delivery(
                DeliveredMessage(
                    delivery=spec.Basic.Deliver("ctag", tag, redelivered, "", "q"),
                    header=ContentHeader(0, len(raw), properties),
                    body=raw,
                    channel=self.channel,  # type: ignore[arg-type]
                )
            )
        )
        return tag

    def counted(self, name: str) -> int:
        return int(self.counters.snapshot().get(name, 0))


@asynccontextmanager
async def rig(
    *,
    hooks: Hooks | None = None,
    max_attempts: int = 3,
    lease_s: float = 5.0,
    classify_delay_s: float = 0.0,
    classifier: Classifier | None = None,
    paused: Callable[[], bool] = lambda: False,
    hold_s: float = 5.0,
) -> AsyncIterator[Rig]:
    """A consumer wired as ``worker.app`` wires it, on the memory store and recording fakes."""
    stopping = QuickStopping()
    counters = Counters(cluster=False)
    store = MemoryClaimStore(
        TokenSource("test"),
        lease_s=lease_s,
        dedup_ttl_s=60,
        max_done=10_000,
        max_attempts=max_attempts,
    )
    outbox = RecordingOutbox()
    failures = Failures(
        outbox=outbox,
        claims=store,
        counters=counters,
        max_attempts=max_attempts,
        stopping=stopping,
        retry_delay_ms=lambda attempt: 1000 * attempt,
        paused=paused,
        hold_s=hold_s,
    )
    cache = ClassificationCache(
        LocalCache(100), link=None, keys=RedisKeys("t:"), identity="kw", ttl_s=60
    )
    cached = CachedClassifier(
        classifier or KeywordClassifier.default(classify_delay_s), cache, counters, flight=None
    )
    async with LeaseKeeper(store, lease_s=lease_s, work_timeout_s=10) as leases:
        pipeline = Pipeline(
            outbox=outbox,
            claims=store,
            leases=leases,
            classifier=cached,
            failures=failures,
            counters=counters,
            hooks=hooks or Hooks(),
        )
        consumer = MessageConsumer(
            limits=ConsumerLimits(max_message_bytes=10_000, max_attempts=max_attempts, prefetch=64),
            claimer=Claimer(store, stopping),
            pipeline=pipeline,
            failures=failures,
            acker=Acker(hold_s=0.0),
            counters=counters,
            stopping=stopping,
        )
        channel = RecordingChannel()
        yield Rig(consumer, channel, outbox, store, counters)
        await consumer.drain(1.0)
