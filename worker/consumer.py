"""One delivery's path: parse, claim, classify through the cache, publish, complete, acknowledge.

Every delivery is settled exactly one way: acknowledged (processed, duplicate, dead-lettered, or
parked for a retry) or requeued (shutdown while it waited). Nothing is acknowledged before what it
stands for is durable: a result is confirmed by the broker before the done marker is written, and
the done marker is written before the acknowledgement.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import structlog
from aio_pika.abc import AbstractIncomingMessage
from structlog.contextvars import bound_contextvars

from worker.acks import Acker, Outcome
from worker.broker import Broker, attempt_of
from worker.cache import text_hash
from worker.classify import CachedClassifier
from worker.counters import Counters
from worker.dedup import ClaimResult, ClaimStatus, ClaimStore, CompleteStatus
from worker.errors import InvalidMessage, PermanentError, PublishFailed, TransientError
from worker.faults import Faults
from worker.keys import Counter
from worker.leases import LeaseKeeper
from worker.models import ChatMessage, parse_message

log = structlog.get_logger("worker.consumer")

BUSY_POLL_MIN_S = 0.02
BUSY_POLL_MAX_S = 0.5


@dataclass(frozen=True, slots=True)
class ConsumerLimits:
    max_message_bytes: int
    max_attempts: int


class MessageConsumer:
    """Handles deliveries; ``on_message`` is the aio-pika consumer callback."""

    def __init__(
        self,
        *,
        limits: ConsumerLimits,
        broker: Broker,
        claims: ClaimStore,
        leases: LeaseKeeper,
        classifier: CachedClassifier,
        acker: Acker,
        counters: Counters,
        faults: Faults,
    ) -> None:
        self._limits = limits
        self._broker = broker
        self._claims = claims
        self._leases = leases
        self._classifier = classifier
        self._acker = acker
        self._counters = counters
        self._faults = faults
        self._tasks: set[asyncio.Task[object]] = set()
        self.stopping = asyncio.Event()

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def on_message(self, delivery: AbstractIncomingMessage) -> None:
        channel = delivery.channel
        tag = delivery.delivery_tag or 0
        self._acker.track(channel, tag)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        outcome = Outcome.REQUEUE
        try:
            outcome = await self._handle(delivery)
        except asyncio.CancelledError:
            outcome = Outcome.REQUEUE
            raise
        except Exception:
            log.exception("message_handling_failed")
            outcome = Outcome.REQUEUE
        finally:
            self._tasks.discard(task)
            self._acker.settle(channel, tag, outcome)

    async def _handle(self, delivery: AbstractIncomingMessage) -> Outcome:
        attempt = attempt_of(delivery)
        try:
            message = parse_message(
                delivery.body, delivery.message_id, self._limits.max_message_bytes
            )
        except InvalidMessage as exc:
            log.warning("message_dead_lettered", reason=exc.reason, detail=exc.detail)
            await self._broker.dead_letter(delivery, exc.reason, exc.detail, attempt)
            self._counters.record(Counter.DEAD_LETTERED)
            return Outcome.ACK
        with bound_contextvars(message_id=message.message_id, attempt=attempt):
            return await self._process(delivery, message, attempt)

    async def _claim(self, message: ChatMessage, redelivered: bool) -> ClaimResult | None:
        """Claim, waiting while another replica holds the ID; ``None`` if we stop meanwhile."""
        delay_s = BUSY_POLL_MIN_S
        while True:
            claim = await self._claims.claim(message.message_id, redelivered)
            if claim.status is not ClaimStatus.BUSY:
                return claim
            # The owner may die; then its copy is redelivered and ours must not be lost: wait.
            wait_s = min(delay_s, max(claim.retry_after_s, BUSY_POLL_MIN_S))
            try:
                await asyncio.wait_for(self.stopping.wait(), timeout=wait_s)
                return None
            except TimeoutError:
                delay_s = min(delay_s * 2, BUSY_POLL_MAX_S)

    async def _process(
        self, delivery: AbstractIncomingMessage, message: ChatMessage, attempt: int
    ) -> Outcome:
        started = time.perf_counter()
        claim = await self._claim(message, bool(delivery.redelivered))
        if claim is None:
            return Outcome.REQUEUE
        if claim.status is ClaimStatus.DONE:
            counter = Counter.REDELIVERED_DONE if delivery.redelivered else Counter.DUPLICATES
            self._counters.record(counter, in_redis=claim.in_redis)
            log.debug("duplicate_skipped", redelivered=delivery.redelivered)
            return Outcome.ACK
        self._faults.hit("kill_after_claim", message.message_id)
        try:
            async with self._leases.working(message.message_id, claim.token):
                self._faults.hit("fail_classify", message.message_id)
                classification, cached = await self._classifier.classify(message.text)
                await self._broker.publish_result(message, classification, cached)
        except (TransientError, PermanentError, TimeoutError) as exc:
            await self._claims.release(message.message_id, claim.token)
            return await self._retry_or_dead_letter(delivery, attempt, exc)
        self._faults.hit("kill_after_publish", message.message_id)
        status = await self._claims.complete(message.message_id, claim.token, cached)
        self._faults.hit("kill_after_complete", message.message_id)
        if status is CompleteStatus.LOST:
            # Our lease lapsed and another replica owns the ID now: it finishes and counts it.
            self._counters.record(Counter.CLAIMS_LOST)
            log.warning("claim_lost_before_completion")
            return Outcome.ACK
        in_redis = status is CompleteStatus.IN_REDIS
        self._counters.record(Counter.PROCESSED, in_redis=in_redis)
        self._counters.record(
            Counter.CACHE_HITS if cached else Counter.CACHE_MISSES, in_redis=in_redis
        )
        self._counters.latency.observe(time.perf_counter() - started)
        log.debug(
            "message_processed",
            label=classification.label,
            cached=cached,
            text_hash=text_hash(message.text),
        )
        return Outcome.ACK

    async def _retry_or_dead_letter(
        self, delivery: AbstractIncomingMessage, attempt: int, exc: BaseException
    ) -> Outcome:
        error = (
            "work timed out or its lease could not be renewed"
            if isinstance(exc, TimeoutError)
            else str(exc)
        )
        self._counters.record(Counter.FAILED)
        try:
            if isinstance(exc, PermanentError) or attempt >= self._limits.max_attempts:
                reason = (
                    "permanent_error" if isinstance(exc, PermanentError) else "retries_exhausted"
                )
                log.warning("message_dead_lettered", reason=reason, error=error)
                await self._broker.dead_letter(delivery, reason, error, attempt)
                self._counters.record(Counter.DEAD_LETTERED)
            else:
                log.warning(
                    "message_retry_scheduled",
                    error=error,
                    delay_ms=self._broker.topology.retry_delay_ms(attempt),
                )
                await self._broker.schedule_retry(delivery, attempt, error)
                self._counters.record(Counter.RETRIED)
        except PublishFailed as publish_exc:
            log.warning("retry_publish_failed", error=str(publish_exc))
            return Outcome.REQUEUE
        return Outcome.ACK

    async def drain(self, timeout_s: float) -> bool:
        """Let messages in progress finish; those still waiting on a busy claim give up at once."""
        self.stopping.set()
        pending = set(self._tasks)
        if pending:
            _, still = await asyncio.wait(pending, timeout=timeout_s)
            for task in still:
                task.cancel()
            if still:
                await asyncio.wait(still, timeout=1.0)
                log.warning("drain_timeout", abandoned=len(still))
                return False
        return True
