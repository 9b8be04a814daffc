"""One delivery's path: parse, claim, classify through the cache, publish, complete, acknowledge.

Every delivery is settled exactly one way: acknowledged (processed, duplicate, dead-lettered, or
parked for a retry) or requeued (shutdown while it waited). Nothing is acknowledged before what it
stands for is durable: a result is confirmed by the broker before the done marker is written, and
the done marker is written before the acknowledgement.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import structlog
from aio_pika.abc import AbstractIncomingMessage
from structlog.contextvars import bound_contextvars

from worker.acks import Acker, Outcome
from worker.broker import Broker, attempt_of
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
    """Handles deliveries; ``on_delivery`` is the (synchronous) aio-pika consumer callback.

    Deliveries wait in an inbox and are taken in passes: each pass parses its deliveries and claims
    all their IDs in one round trip, then works on each claimed message concurrently. At most
    ``max_passes`` run at once, so under load deliveries accumulate meanwhile and passes grow:
    batching adapts to the load without a fixed delay.
    """

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
        max_passes: int = 4,
    ) -> None:
        self._limits = limits
        self._broker = broker
        self._claims = claims
        self._leases = leases
        self._classifier = classifier
        self._acker = acker
        self._counters = counters
        self._faults = faults
        self._max_passes = max_passes
        self._inbox: list[AbstractIncomingMessage] = []
        self._pass_scheduled = False
        self._passes: set[asyncio.Task[None]] = set()
        self._waiters: set[asyncio.Task[None]] = set()
        self._in_flight = 0
        self.stopping = asyncio.Event()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def on_delivery(self, delivery: AbstractIncomingMessage) -> None:
        """Take a delivery (in arrival order) and make sure a pass will pick it up."""
        self._acker.track(delivery.channel, delivery.delivery_tag or 0)
        self._inbox.append(delivery)
        self._in_flight += 1
        if not self._pass_scheduled:
            self._pass_scheduled = True
            asyncio.get_running_loop().call_soon(self._start_passes)

    def _start_passes(self) -> None:
        self._pass_scheduled = False
        while self._inbox and len(self._passes) < self._max_passes:
            deliveries, self._inbox = self._inbox, []
            task = asyncio.get_running_loop().create_task(self._run_pass(deliveries))
            self._passes.add(task)
            task.add_done_callback(self._pass_done)

    def _pass_done(self, task: asyncio.Task[None]) -> None:
        self._passes.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("pass_failed", error=repr(task.exception()))
        if self._inbox and not self._pass_scheduled:
            self._pass_scheduled = True
            asyncio.get_running_loop().call_soon(self._start_passes)

    def _settle(self, delivery: AbstractIncomingMessage, outcome: Outcome) -> None:
        self._in_flight -= 1
        self._acker.settle(delivery.channel, delivery.delivery_tag or 0, outcome)

    async def _run_pass(self, deliveries: list[AbstractIncomingMessage]) -> None:
        parsed: list[tuple[AbstractIncomingMessage, ChatMessage, int]] = []
        rejected = []
        for delivery in deliveries:
            attempt = attempt_of(delivery)
            try:
                message = parse_message(
                    delivery.body, delivery.message_id, self._limits.max_message_bytes
                )
            except InvalidMessage as exc:
                rejected.append(self._guarded(delivery, self._reject(delivery, exc, attempt)))
            else:
                parsed.append((delivery, message, attempt))
        work = list(rejected)
        if parsed:
            try:
                claims = await self._claims.claim_many(
                    [(m.message_id, bool(d.redelivered)) for d, m, _ in parsed]
                )
            except Exception:
                log.exception("claim_failed")
                for delivery, _, _ in parsed:
                    self._settle(delivery, Outcome.REQUEUE)
                claims = []
            for (delivery, message, attempt), claim in zip(parsed, claims, strict=False):
                coroutine = self._after_claim(delivery, message, attempt, claim)
                if claim.status is ClaimStatus.BUSY:
                    waiter = asyncio.get_running_loop().create_task(
                        self._guarded(delivery, coroutine)
                    )
                    self._waiters.add(waiter)
                    waiter.add_done_callback(self._waiters.discard)
                else:
                    work.append(self._guarded(delivery, coroutine))
        if work:
            await asyncio.gather(*work)

    async def _guarded(
        self, delivery: AbstractIncomingMessage, step: Coroutine[Any, Any, Outcome]
    ) -> None:
        """Run one delivery's remaining work and settle it exactly once, whatever happens."""
        outcome = Outcome.REQUEUE
        try:
            outcome = await step
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("message_handling_failed")
        finally:
            self._settle(delivery, outcome)

    async def _reject(
        self, delivery: AbstractIncomingMessage, exc: InvalidMessage, attempt: int
    ) -> Outcome:
        log.warning("message_dead_lettered", reason=exc.reason, detail=exc.detail)
        await self._broker.dead_letter(delivery, exc.reason, exc.detail, attempt)
        self._counters.record(Counter.DEAD_LETTERED)
        return Outcome.ACK

    async def _after_claim(
        self,
        delivery: AbstractIncomingMessage,
        message: ChatMessage,
        attempt: int,
        claim: ClaimResult,
    ) -> Outcome:
        with bound_contextvars(message_id=message.message_id, attempt=attempt):
            if claim.status is ClaimStatus.BUSY:
                resolved = await self._claim(message, bool(delivery.redelivered))
                if resolved is None:
                    return Outcome.REQUEUE
                claim = resolved
            return await self._process(delivery, message, attempt, claim)

    async def _claim(self, message: ChatMessage, redelivered: bool) -> ClaimResult | None:
        """Wait while another replica holds the ID, then claim; ``None`` if we stop meanwhile.

        The owner may die; then its copy is redelivered and ours must not be lost, so we hold the
        delivery and ask again with backoff (never longer than the owner's remaining lease).
        """
        delay_s = BUSY_POLL_MIN_S
        while True:
            try:
                await asyncio.wait_for(self.stopping.wait(), timeout=delay_s)
                return None
            except TimeoutError:
                pass
            claim = await self._claims.claim(message.message_id, redelivered)
            if claim.status is not ClaimStatus.BUSY:
                return claim
            delay_s = min(delay_s * 2, BUSY_POLL_MAX_S, max(claim.retry_after_s, BUSY_POLL_MIN_S))

    async def _process(
        self,
        delivery: AbstractIncomingMessage,
        message: ChatMessage,
        attempt: int,
        claim: ClaimResult,
    ) -> Outcome:
        started = time.perf_counter()
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
        log.debug("message_processed", label=classification.label, cached=cached)
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
        """Let messages in progress finish; those still waiting on a busy claim give up at once.

        Deliveries not finished by ``timeout_s`` are abandoned: the broker redelivers them when the
        channel closes.
        """
        self.stopping.set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self._inbox or self._passes or self._waiters:
            self._start_passes()
            pending = self._passes | self._waiters
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            if pending:
                await asyncio.wait(pending, timeout=remaining)
            else:
                await asyncio.sleep(0)
        abandoned = self._passes | self._waiters
        for task in abandoned:
            task.cancel()
        if abandoned:
            await asyncio.wait(abandoned, timeout=1.0)
        for delivery in self._inbox:
            self._settle(delivery, Outcome.REQUEUE)
        self._inbox.clear()
        if abandoned:
            log.warning("drain_timeout", abandoned=len(abandoned))
            return False
        return True
