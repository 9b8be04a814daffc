"""One delivery's path: parse, claim, classify through the cache, publish, complete, acknowledge.

Every delivery is settled exactly one way: acknowledged (processed, duplicate, dead-lettered, or
parked for a retry) or requeued (shutdown while it waited). Nothing is acknowledged before what it
stands for is durable: a result is confirmed by the broker before the done marker is written, and
the done marker is written before the acknowledgement.

The claimed messages of a pass are worked on together (``_work_batch``): one lease deadline, one
classification call, one write of results, one completion script. Busy IDs, suspects, and copies
of an ID already in work here take the per-message path.

Failures never turn into a hot loop: a failed attempt is retried through a delay queue
(``worker.processing.failures``) and counted (``MAX_ATTEMPTS``, counted per message ID at claim time, so a
replica killed by a message counts too), and the rare requeue after a failure nobody expected
waits ``REQUEUE_PAUSE_S`` first. While
the claim store must wait for Redis (strict mode, or the first seconds of an outage) a pass holds
its deliveries unacknowledged and the consumer reports itself ``paused``.

A message two of whose attempts vanished (started, never ended: their replicas died) is a
suspect: it may be what kills them, or it may have been in flight with what does. The claim
script reports it instead of claiming it (the attempt header says how many attempts ended), and
suspects are then worked on one at a time and alone: before one is claimed, no new claim is made
and the messages in work finish. A message that kills its replica then takes only itself down,
and only its own attempts run out; the innocent messages caught with it twice are processed.
After a single crash, redeliveries are processed as usual, in parallel.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import structlog
from aiormq.abc import DeliveredMessage
from aiormq.exceptions import ChannelInvalidStateError
from structlog.contextvars import bound_contextvars

from worker.amqp.acks import Acker, Outcome
from worker.amqp.broker import Broker, attempt_of, publish_failed
from worker.amqp.delivery import Delivery
from worker.claims.leases import LeaseKeeper
from worker.claims.store import (
    ClaimAsk,
    ClaimResult,
    ClaimStatus,
    ClaimStore,
    CompleteStatus,
    Completion,
    Lease,
)
from worker.classification.cached import CachedClassifier, Classified
from worker.core.errors import (
    ClassifierUnavailable,
    InvalidMessage,
    PermanentError,
    StoreUnavailable,
)
from worker.core.gathering import run_all
from worker.core.models import ChatMessage, parse_message
from worker.observability.counters import Counters
from worker.observability.metrics import CounterName
from worker.processing.failures import REQUEUE_PAUSE_S, Claimed, Failures
from worker.processing.faults import Faults

log = structlog.get_logger("worker.processing.consumer")

BUSY_POLL_MIN_S = 0.02
BUSY_POLL_MAX_S = 0.5
ISOLATION_POLL_S = 0.005
STORE_POLL_MIN_S = 0.05
STORE_POLL_MAX_S = 0.5
# A message of a batch whose work has not reached its end (its lease deadline passed before).
UNFINISHED: BaseException = TimeoutError("the work did not finish")


def _confirmed(future: asyncio.Future[object]) -> bool:
    return future.done() and not future.cancelled() and future.exception() is None


def _retrieve(future: asyncio.Future[object]) -> None:
    if not future.cancelled():
        future.exception()


def seen_before(delivery: Delivery) -> bool:
    """A redelivery, or a retry's copy: a done ID then is not a duplicate the producer sent."""
    return bool(delivery.redelivered) or attempt_of(delivery) > 1


def suspect_at(delivery: Delivery) -> int:
    """Attempts started from which the message is a suspect: two more than the header records
    as ended (``attempt - 1`` failed and were retried), so two vanished with their replica."""
    return attempt_of(delivery) + 1


@dataclass(frozen=True, slots=True)
class ConsumerLimits:
    max_message_bytes: int
    max_attempts: int
    prefetch: int = 1024  # the channel's prefetch window (passes share it, see _start_passes)


class MessageConsumer:
    """Handles deliveries; ``on_delivery`` is the (synchronous) aio-pika consumer callback.

    Deliveries wait in an inbox and are taken in passes: each pass parses its deliveries and claims
    all their IDs in one round trip, then works on each claimed message concurrently. At most
    ``max_passes`` run at once, so under load deliveries accumulate meanwhile and passes grow:
    batching adapts to the load without a fixed delay. A pass takes at most its share of the
    prefetch window (``prefetch / max_passes``): one pass holding the whole window would leave the
    CPU idle while it waits for Redis or the broker, where with the window shared another pass
    computes meanwhile. Two passes of half the window each did best in case (b) of
    ``bench/run.py`` (prefetch 1024, three rounds each, median ratio to the bare consumer: four
    passes of a quarter 0.90, two of a half 0.95): a pass's costs per message fall as it grows.
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
        max_passes: int = 2,
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
        self._pass_size = max(1, -(-limits.prefetch // max_passes))
        self._failures = Failures(
            broker=broker,
            claims=claims,
            counters=counters,
            max_attempts=limits.max_attempts,
            pause=self._pause,
        )
        self._inbox: list[Delivery] = []
        # IDs in a pass of this replica: a copy that arrives meanwhile waits for it (see _run_pass).
        # The future is True once the work finished (its done marker is written), False if the
        # pass ended without that.
        self._local_work: dict[str, asyncio.Future[bool]] = {}
        self._pass_scheduled = False
        self._passes: set[asyncio.Task[None]] = set()
        self._waiters: set[asyncio.Task[None]] = set()
        self._in_flight = 0
        self._holding = 0
        self._alone = asyncio.Lock()  # suspects are worked on one at a time
        self._open = asyncio.Event()  # cleared while a suspect is claimed and worked on alone
        self._open.set()
        self._claiming = 0  # claim calls in flight outside passes (busy waiters)
        self._working = 0  # messages claimed and being worked on
        self.stopping = asyncio.Event()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def paused(self) -> bool:
        """True while deliveries wait for the claim store (Redis) before they can be claimed."""
        return self._holding > 0

    def on_delivery(self, raw: DeliveredMessage) -> None:
        """Take a delivery (in arrival order) and make sure a pass will pick it up."""
        delivery = Delivery(raw)
        self._acker.track(delivery.channel, delivery.delivery_tag)
        self._inbox.append(delivery)
        self._in_flight += 1
        self._wake()

    def _wake(self) -> None:
        """Make sure a pass will look at the inbox soon."""
        if self._inbox and not self._pass_scheduled:
            self._pass_scheduled = True
            asyncio.get_running_loop().call_soon(self._start_passes)

    def _start_passes(self) -> None:
        self._pass_scheduled = False
        size = self._pass_size
        while self._inbox and len(self._passes) < self._max_passes and self._open.is_set():
            deliveries, self._inbox = self._inbox[:size], self._inbox[size:]
            task = asyncio.get_running_loop().create_task(self._run_pass(deliveries))
            self._passes.add(task)
            task.add_done_callback(self._pass_done)

    def _pass_done(self, task: asyncio.Task[None]) -> None:
        self._passes.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("pass_failed", error=repr(task.exception()))
        self._wake()

    def _settle(self, delivery: Delivery, outcome: Outcome) -> None:
        self._in_flight -= 1
        try:
            channel = delivery.channel
        except ChannelInvalidStateError:
            return  # its channel closed (broker connection lost): the broker redelivers it
        self._acker.settle(channel, delivery.delivery_tag, outcome)

    async def _run_pass(self, deliveries: list[Delivery]) -> None:
        parsed: list[tuple[Delivery, ChatMessage]] = []
        work: list[Coroutine[Any, Any, None]] = []
        for delivery in deliveries:
            if delivery.stale:  # its copy comes again on the new channel: claimed and counted then
                self._settle(delivery, Outcome.REQUEUE)
                continue
            try:
                message = parse_message(
                    delivery.body, delivery.message_id, self._limits.max_message_bytes
                )
            except InvalidMessage as exc:
                work.append(self._guarded(delivery, self._failures.reject(delivery, exc)))
            else:
                parsed.append((delivery, message))
        firsts: list[tuple[Delivery, ChatMessage]] = []
        for delivery, message in parsed:
            earlier = self._local_work.get(message.message_id)
            if earlier is None:
                self._local_work[message.message_id] = asyncio.get_running_loop().create_future()
                firsts.append((delivery, message))
            else:
                earlier.add_done_callback(partial(self._after_local_work, delivery, message))
        try:
            if firsts:
                work.append(self._claim_and_work(firsts))
            await run_all(work)
        finally:
            for _, message in firsts:
                ended = self._local_work.pop(message.message_id)
                if not ended.done():
                    ended.set_result(False)

    def _after_local_work(
        self, delivery: Delivery, message: ChatMessage, work: asyncio.Future[bool]
    ) -> None:
        """A copy of an ID that was in work here when it came. Once that work finished, the copy
        is a duplicate (its done marker is written): settle it without asking Redis. If the pass
        ended without that (the attempt failed, or its claim was lost), claim it now, rather than
        poll a busy claim. (A copy whose channel closed meanwhile goes back to the inbox too,
        where the next pass drops it uncounted.)"""
        if work.result() and not delivery.stale:
            done = ClaimResult(ClaimStatus.DONE)
            self._settle(delivery, self._skip_done(delivery, message.message_id, done))
            return
        self._inbox.append(delivery)
        self._wake()

    def _finished(self, message_id: str) -> None:
        """The work on ``message_id`` finished: copies waiting on it here are duplicates now."""
        work = self._local_work.get(message_id)
        if work is not None and not work.done():
            work.set_result(True)

    async def _claim_and_work(self, parsed: list[tuple[Delivery, ChatMessage]]) -> None:
        """Claim the pass's IDs in one round trip, then work on each claimed message concurrently."""
        claims = await self._claim_all(
            [ClaimAsk(m.message_id, seen_before(d), suspect_at(d)) for d, m in parsed]
        )
        if claims is None:
            for delivery, _ in parsed:
                self._settle(delivery, Outcome.REQUEUE)
            return
        work: list[Coroutine[Any, Any, None]] = []
        together: list[Claimed] = []
        for (delivery, message), claim in zip(parsed, claims, strict=True):
            if claim.status is ClaimStatus.DONE:
                self._settle(delivery, self._skip_done(delivery, message.message_id, claim))
            elif claim.status is ClaimStatus.CLAIMED and (
                max(attempt_of(delivery), claim.attempt) <= self._limits.max_attempts
            ):
                together.append((delivery, message, claim))
            elif claim.status in (ClaimStatus.BUSY, ClaimStatus.SUSPECT):
                coroutine = self._after_claim(delivery, message, claim)
                waiter = asyncio.get_running_loop().create_task(self._guarded(delivery, coroutine))
                self._waiters.add(waiter)
                waiter.add_done_callback(self._waiters.discard)
            else:
                work.append(self._guarded(delivery, self._after_claim(delivery, message, claim)))
        if together:
            work.append(self._work_batch(together))
        await run_all(work)

    async def _claim_all(self, requests: list[ClaimAsk]) -> list[ClaimResult] | None:
        """Claim ``requests``; while the store waits for Redis, hold them. ``None``: requeue them."""
        delay_s = STORE_POLL_MIN_S
        holding = False
        try:
            while True:
                try:
                    return await self._claims.claim_many(requests)
                except StoreUnavailable:
                    if not holding:
                        holding = True
                        self._hold(+1)
                except Exception:
                    log.exception("claim_failed")
                    await self._pause(REQUEUE_PAUSE_S)
                    return None
                if await self._pause(delay_s):
                    return None
                delay_s = min(delay_s * 2, STORE_POLL_MAX_S)
        finally:
            if holding:
                self._hold(-1)

    def _hold(self, change: int) -> None:
        was_paused = self.paused
        self._holding += change
        if self.paused and not was_paused:
            log.warning("consumer_paused", reason="claims are waiting for Redis")
        elif was_paused and not self.paused:
            log.info("consumer_resumed")

    async def _pause(self, seconds: float) -> bool:
        """Wait ``seconds``, or less if the consumer is stopping; ``True`` when it is."""
        if self.stopping.is_set():
            return True
        try:
            await asyncio.wait_for(self.stopping.wait(), timeout=seconds)
        except TimeoutError:
            return False
        return True

    async def _work_alone(self, delivery: Delivery, message: ChatMessage) -> Outcome:
        """Claim and process a suspect with nothing else claimed or in work in this replica."""
        async with self._alone:
            try:
                claim = await self._claim_alone(delivery, message)
                if claim is None:
                    return Outcome.REQUEUE
                attempt = max(attempt_of(delivery), claim.attempt)
                with bound_contextvars(attempt=attempt, alone=True):
                    return await self._process(delivery, message, attempt, claim)
            finally:
                self._reopen()

    async def _claim_alone(self, delivery: Delivery, message: ChatMessage) -> ClaimResult | None:
        """Claim once nothing else is claimed or in work here; ``None`` if we stop meanwhile, or
        the delivery's channel closed."""
        delay_s = BUSY_POLL_MIN_S
        while True:
            if not await self._isolate() or delivery.stale:
                return None
            try:
                claim = await self._claims.claim(message.message_id, seen_before(delivery))
            except StoreUnavailable:
                claim = ClaimResult(ClaimStatus.BUSY, retry_after_s=STORE_POLL_MAX_S)
            if claim.status is not ClaimStatus.BUSY:
                return claim
            # Another replica holds it (maybe a dead one, until its lease lapses): let the other
            # messages flow meanwhile.
            self._reopen()
            if await self._pause(delay_s):
                return None
            delay_s = min(delay_s * 2, BUSY_POLL_MAX_S, max(claim.retry_after_s, BUSY_POLL_MIN_S))

    async def _isolate(self) -> bool:
        """Stop new claims and wait until nothing is being claimed or worked on; ``False`` if
        the consumer is stopping."""
        self._open.clear()
        while self._passes or self._claiming or self._working:
            if await self._pause(ISOLATION_POLL_S):
                return False
        return True

    def _reopen(self) -> None:
        if self._open.is_set():
            return
        self._open.set()
        self._wake()

    async def _guarded(self, delivery: Delivery, step: Coroutine[Any, Any, Outcome]) -> None:
        """Run one delivery's remaining work and settle it exactly once, whatever happens."""
        outcome = Outcome.REQUEUE
        try:
            outcome = await step
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("message_handling_failed")
            await self._pause(REQUEUE_PAUSE_S)  # requeued at once, it could come straight back
        finally:
            self._settle(delivery, outcome)

    async def _after_claim(
        self, delivery: Delivery, message: ChatMessage, claim: ClaimResult
    ) -> Outcome:
        with bound_contextvars(message_id=message.message_id):
            if claim.status is ClaimStatus.BUSY:
                resolved = await self._claim(delivery, message)
                if resolved is None:
                    return Outcome.REQUEUE
                claim = resolved
            if claim.status is ClaimStatus.SUSPECT:
                log.info("suspect_isolated", attempts_started=claim.attempt)
                return await self._work_alone(delivery, message)
            # The store counts attempts at claim time; the header survives a Redis outage.
            attempt = max(attempt_of(delivery), claim.attempt)
            with bound_contextvars(attempt=attempt):
                return await self._process(delivery, message, attempt, claim)

    async def _claim(self, delivery: Delivery, message: ChatMessage) -> ClaimResult | None:
        """Wait while another replica holds the ID, then claim; ``None`` if we stop meanwhile, or
        the delivery's channel closed (the broker redelivers it: claimed and counted then).

        The owner may die; then its copy is redelivered and ours must not be lost, so we hold the
        delivery and ask again with backoff (never longer than the owner's remaining lease).
        """
        redelivered, suspect_from = seen_before(delivery), suspect_at(delivery)
        delay_s = BUSY_POLL_MIN_S
        while True:
            if await self._pause(delay_s) or delivery.stale:
                return None
            if not self._open.is_set():  # a suspect is being worked on alone
                continue
            self._claiming += 1
            try:
                claim = await self._claims.claim(message.message_id, redelivered, suspect_from)
            except StoreUnavailable:
                delay_s = min(delay_s * 2, BUSY_POLL_MAX_S)
                continue
            finally:
                self._claiming -= 1
            if claim.status is not ClaimStatus.BUSY:
                return claim
            delay_s = min(delay_s * 2, BUSY_POLL_MAX_S, max(claim.retry_after_s, BUSY_POLL_MIN_S))

    def _skip_done(self, delivery: Delivery, message_id: str, claim: ClaimResult) -> Outcome:
        """An ID already processed: count it (a duplicate, or a redelivery of a done one), ack."""
        self._finished(message_id)
        again = seen_before(delivery)
        counter = CounterName.REDELIVERED_DONE if again else CounterName.DUPLICATES
        self._counters.record(counter, in_redis=claim.in_redis)
        log.debug("duplicate_skipped", message_id=message_id, redelivered=again)
        return Outcome.ACK

    async def _process(
        self,
        delivery: Delivery,
        message: ChatMessage,
        attempt: int,
        claim: ClaimResult,
    ) -> Outcome:
        if claim.status is ClaimStatus.DONE:
            return self._skip_done(delivery, message.message_id, claim)
        if claim.status is ClaimStatus.EXHAUSTED:
            return await self._failures.exhausted(delivery, claim.attempt)
        if attempt > self._limits.max_attempts:  # by the header: MAX_ATTEMPTS was lowered
            await self._claims.release(message.message_id, claim.token)
            return await self._failures.exhausted(delivery, attempt - 1)
        self._working += 1
        try:
            return await self._work(delivery, message, attempt, claim)
        finally:
            self._working -= 1

    async def _work(
        self,
        delivery: Delivery,
        message: ChatMessage,
        attempt: int,
        claim: ClaimResult,
    ) -> Outcome:
        """One message on its own (a suspect, or after waiting for a busy claim)."""
        started = time.perf_counter()
        self._faults.hit("kill_after_claim", message.message_id)
        try:
            async with self._leases.working(message.message_id, claim.token):
                self._faults.hit("fail_classify", message.message_id)
                classification, cached = await self._classifier.classify(message.text)
                await self._broker.publish_result(message, classification, cached)
        except Exception as exc:
            return await self._failures.failed((delivery, message, claim), attempt, exc)
        self._faults.hit("kill_after_publish", message.message_id)
        status = await self._claims.complete(message.message_id, claim.token, cached)
        self._faults.hit("kill_after_complete", message.message_id)
        return self._completed(message.message_id, status, cached, started)

    async def _work_batch(self, batch: list[Claimed]) -> None:
        """The usual case: a pass's claimed messages worked on together, under one lease
        deadline, with one classification call, one socket write of results and one completion
        script for all of them. A message that fails on the way is released and retried (or
        dead-lettered) on its own; every delivery is settled exactly once, whatever happens."""
        started = time.perf_counter()
        outcomes = [Outcome.REQUEUE] * len(batch)
        self._working += len(batch)
        try:
            for _, message, _ in batch:
                self._faults.hit("kill_after_claim", message.message_id)
            produced = await self._produce(batch)
            done = [(i, p) for i, p in enumerate(produced) if not isinstance(p, BaseException)]
            for i, _ in done:
                self._faults.hit("kill_after_publish", batch[i][1].message_id)
            statuses = await self._claims.complete_many(
                [Completion(batch[i][1].message_id, batch[i][2].token, p[1]) for i, p in done]
            )
            completed: list[tuple[str, CompleteStatus, bool]] = []
            for (i, (_, cached)), status in zip(done, statuses, strict=True):
                self._faults.hit("kill_after_complete", batch[i][1].message_id)
                completed.append((batch[i][1].message_id, status, cached))
                outcomes[i] = Outcome.ACK
            self._count_completed(completed, started)
            failed = [(i, p) for i, p in enumerate(produced) if isinstance(p, BaseException)]
            if failed:
                handled = await asyncio.gather(
                    *(self._failed_alone(batch[i], exc) for i, exc in failed),
                    return_exceptions=True,
                )
                for (i, _), outcome in zip(failed, handled, strict=True):
                    if isinstance(outcome, Outcome):
                        outcomes[i] = outcome
                    else:
                        log.error("message_handling_failed", exc_info=outcome)
        except Exception:
            log.exception("message_handling_failed")
            await self._pause(REQUEUE_PAUSE_S)  # requeued at once, they could come straight back
        finally:
            self._working -= len(batch)
            for (delivery, _, _), outcome in zip(batch, outcomes, strict=True):
                self._settle(delivery, outcome)

    async def _produce(self, batch: list[Claimed]) -> list[Classified | BaseException]:
        """Classify and publish the batch's results under its leases: per message, the
        classification once the broker confirmed its result, or why it did not get there."""
        produced: list[Classified | BaseException] = [UNFINISHED] * len(batch)
        confirms: dict[int, asyncio.Future[object]] = {}
        try:
            async with self._leases.working_many(
                [Lease(m.message_id, c.token) for _, m, c in batch]
            ):
                asked: list[int] = []
                for i, (_, message, _) in enumerate(batch):
                    try:
                        self._faults.hit("fail_classify", message.message_id)
                    except ClassifierUnavailable as exc:
                        produced[i] = exc
                    else:
                        asked.append(i)
                answers = await self._classifier.classify_many([batch[i][1].text for i in asked])
                for i, answer in zip(asked, answers, strict=True):
                    if isinstance(answer, BaseException):
                        produced[i] = answer
                        continue
                    try:
                        confirms[i] = self._broker.queue_result(batch[i][1], *answer)
                    except PermanentError as exc:
                        produced[i] = exc
                    else:
                        produced[i] = answer
                if confirms:
                    await asyncio.wait(confirms.values())
        except TimeoutError as exc:  # the lease deadline: what is not confirmed by now fails
            for i, so_far in enumerate(produced):
                if so_far is UNFINISHED or (i in confirms and not _confirmed(confirms[i])):
                    produced[i] = exc
                    if i in confirms:  # its confirm may still come (or fail): nobody reads it
                        confirms.pop(i).add_done_callback(_retrieve)
        for i, confirm in confirms.items():
            if _confirmed(confirm):
                continue
            # Whatever ended it (a nack, the channel closing under it, with an exception of any
            # type, or a cancellation), the result is not known to be published.
            error = None if confirm.cancelled() else confirm.exception()
            if isinstance(error, PermanentError):
                produced[i] = error
            else:
                produced[i] = publish_failed(error or asyncio.CancelledError())
        return produced

    async def _failed_alone(self, item: Claimed, exc: BaseException) -> Outcome:
        delivery, message, claim = item
        attempt = max(attempt_of(delivery), claim.attempt)
        with bound_contextvars(message_id=message.message_id, attempt=attempt):
            return await self._failures.failed(item, attempt, exc)

    def _completed(
        self, message_id: str, status: CompleteStatus, cached: bool, started: float
    ) -> Outcome:
        """Count a message whose result is published and whose completion ran; ack it."""
        self._count_completed([(message_id, status, cached)], started)
        return Outcome.ACK

    def _count_completed(
        self, completed: Sequence[tuple[str, CompleteStatus, bool]], started: float
    ) -> None:
        """Count messages whose results are published and whose completions ran (all of them
        are acked), in one call per counter."""
        processed = {True: 0, False: 0}  # by in_redis
        hits = {True: 0, False: 0}
        for message_id, status, cached in completed:
            if status is CompleteStatus.LOST:
                # Our lease lapsed and another replica owns the ID now: it finishes and counts it.
                self._counters.record(CounterName.CLAIMS_LOST)
                log.warning("claim_lost_before_completion", message_id=message_id)
                continue
            self._finished(message_id)
            in_redis = status is CompleteStatus.IN_REDIS or status is CompleteStatus.DEFERRED
            processed[in_redis] += 1
            hits[in_redis] += cached
            log.debug("message_processed", message_id=message_id, cached=cached)
        for in_redis in (True, False):
            if not processed[in_redis]:
                continue
            self._counters.record(CounterName.PROCESSED, processed[in_redis], in_redis=in_redis)
            if hits[in_redis]:
                self._counters.record(CounterName.CACHE_HITS, hits[in_redis], in_redis=in_redis)
            if misses := processed[in_redis] - hits[in_redis]:
                self._counters.record(CounterName.CACHE_MISSES, misses, in_redis=in_redis)
        if done := processed[True] + processed[False]:
            self._counters.latency.observe(time.perf_counter() - started, done)

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
