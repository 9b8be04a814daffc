"""The inbox: deliveries are taken in passes, claimed, triaged, and worked on in batches.

Every delivery is settled exactly once: acknowledged (processed, duplicate, dead-lettered, parked
for a retry, or held while the classifier is paused and sent to the back) or requeued (shutdown
while it waited, or a held one whose classifier came back). The claim's answer is decided in one
place (``worker.processing.triage``) and acted on in one place (``_act``), whatever brought the
delivery there: a pass, the end of a busy wait, or a suspect's turn to be worked on alone. Claimed
messages go through the one pipeline (``worker.processing.pipeline``), a batch of one being a batch.

Deliveries wait in the inbox and are taken in passes: each pass parses its deliveries and claims
all their IDs in one round trip. At most ``max_passes`` run at once, so under load deliveries
accumulate meanwhile and passes grow: batching adapts to the load without a fixed delay. A pass
takes at most its share of the prefetch window (``prefetch / max_passes``), so that while one pass
waits for Redis or the broker another computes (the README's benchmark section has the numbers).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from structlog.contextvars import bound_contextvars

from worker.amqp.acks import Acker, Outcome
from worker.amqp.broker import attempts_of
from worker.amqp.delivery import Delivery
from worker.claims.protocol import ClaimAsk, ClaimResult, ClaimStatus
from worker.core.errors import InvalidMessage
from worker.core.gathering import run_all
from worker.core.models import ChatMessage, parse_message
from worker.observability.counters import Counters
from worker.observability.metrics import CounterName
from worker.processing.claiming import Claimer
from worker.processing.failures import REQUEUE_PAUSE_S, Failures
from worker.processing.followups import FollowUps, seen_before, suspect_at
from worker.processing.isolation import Isolation
from worker.processing.local import LocalWork
from worker.processing.pipeline import Pipeline
from worker.processing.stopping import Stopping
from worker.processing.triage import Triage, Verdict, triage
from worker.processing.work import Claimed, Work

log = structlog.get_logger("worker.processing.inbox")

DONE = ClaimResult(ClaimStatus.DONE)


@dataclass(frozen=True, slots=True)
class ConsumerLimits:
    max_message_bytes: int
    max_attempts: int
    prefetch: int = 1024  # the channel's prefetch window (passes share it)


class MessageConsumer:
    """Takes deliveries (``on_delivery``, called inline by the channel's reader) and settles each
    exactly once; see the module docstring."""

    def __init__(
        self,
        *,
        limits: ConsumerLimits,
        claimer: Claimer,
        pipeline: Pipeline,
        failures: Failures,
        acker: Acker,
        counters: Counters,
        stopping: Stopping,
        max_passes: int = 2,
    ) -> None:
        self._limits = limits
        self._claimer = claimer
        self._pipeline = pipeline
        self._failures = failures
        self._acker = acker
        self._counters = counters
        self._stopping = stopping
        self._max_passes = max_passes
        self._pass_size = max(1, -(-limits.prefetch // max_passes))
        self._inbox: list[Delivery] = []
        self._unsettled: set[Delivery] = set()
        self._local_work = LocalWork(self._after_local_work)
        self._pass_scheduled = False
        self._passes: set[asyncio.Task[None]] = set()
        self._working = 0  # messages claimed and being worked on
        self._isolation = Isolation(stopping, busy=self._busy, on_reopen=self._wake)
        self._followups = FollowUps(
            claimer=claimer,
            isolation=self._isolation,
            stopping=stopping,
            act=self._act,
            settle_if_open=self._settle_if_open,
            hold=failures.hold,
        )

    @property
    def in_flight(self) -> int:
        return len(self._unsettled)

    @property
    def paused(self) -> bool:
        """True while deliveries wait for the claim store (Redis) before they can be claimed."""
        return self._claimer.paused

    def on_delivery(self, delivery: Delivery) -> None:
        """Take a delivery (in arrival order) and make sure a pass will pick it up."""
        self._acker.track(delivery.channel, delivery.delivery_tag)
        self._unsettled.add(delivery)
        self._inbox.append(delivery)
        self._wake()

    def _busy(self) -> bool:
        return bool(self._passes or self._followups.claiming or self._working)

    def _wake(self) -> None:
        """Make sure a pass will look at the inbox soon."""
        if self._inbox and not self._pass_scheduled:
            self._pass_scheduled = True
            asyncio.get_running_loop().call_soon(self._start_passes)

    def _start_passes(self) -> None:
        self._pass_scheduled = False
        size = self._pass_size
        while self._inbox and len(self._passes) < self._max_passes and self._isolation.open:
            deliveries, self._inbox = self._inbox[:size], self._inbox[size:]
            task = asyncio.get_running_loop().create_task(self._run_pass(deliveries))
            self._passes.add(task)
            task.add_done_callback(self._pass_done)

    def _pass_done(self, task: asyncio.Task[None]) -> None:
        self._passes.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("pass_failed", exc_info=exc)
        self._wake()

    def _settle(self, delivery: Delivery, outcome: Outcome) -> None:
        if delivery not in self._unsettled:
            log.error("delivery_settled_twice", delivery_tag=delivery.delivery_tag)
            return
        self._unsettled.discard(delivery)
        self._pipeline.hooks.settled(delivery, outcome)
        if delivery.stale:
            return  # its channel closed (broker connection lost): the broker redelivers it
        self._acker.settle(delivery.channel, delivery.delivery_tag, outcome)

    def _settle_if_open(self, delivery: Delivery, outcome: Outcome) -> None:
        """Settle ``delivery`` unless something settled it already."""
        if delivery in self._unsettled:
            self._settle(delivery, outcome)

    async def _finish(
        self, delivery: Delivery, step: Awaitable[Outcome], message_id: str | None = None
    ) -> None:
        """Run one delivery's remaining step and settle it exactly once, whatever happens."""
        outcome = Outcome.REQUEUE
        try:
            with bound_contextvars(message_id=message_id or delivery.message_id):
                outcome = await step
        except Exception:
            log.exception("message_handling_failed")
            await self._stopping.pause(REQUEUE_PAUSE_S)  # requeued at once, it could come back
        finally:
            self._settle(delivery, outcome)

    async def _run_pass(self, deliveries: list[Delivery]) -> None:
        steps: list[Coroutine[Any, Any, None]] = []
        parsed: list[tuple[Delivery, ChatMessage]] = []
        for delivery in deliveries:
            if delivery.stale:  # its copy comes again on the new channel: claimed and counted then
                self._settle(delivery, Outcome.REQUEUE)
                continue
            try:
                message = parse_message(
                    delivery.body, delivery.message_id, self._limits.max_message_bytes
                )
            except InvalidMessage as exc:
                steps.append(self._finish(delivery, self._failures.reject(delivery, exc)))
            else:
                parsed.append((delivery, message))
        firsts = self._local_work.take(parsed)
        try:
            if firsts:
                steps.append(self._claim_and_act(firsts))
            await run_all(steps)
        finally:
            self._local_work.release(firsts)

    def _after_local_work(self, delivery: Delivery, message: ChatMessage, finished: bool) -> None:
        """A copy of an ID in work here when it came (``worker.processing.local``): triaged as
        done if that work finished, else back to the inbox (a stale one is dropped there)."""
        if finished and not delivery.stale:
            verdict = self._verdict_of(delivery, DONE).verdict
            self._act_on_done(Claimed(delivery, message, DONE), verdict)
            return
        self._inbox.append(delivery)
        self._wake()

    async def _claim_and_act(self, parsed: list[tuple[Delivery, ChatMessage]]) -> None:
        """Claim the pass's IDs in one round trip, then act on each answer."""
        asks = [ClaimAsk(m.message_id, seen_before(d), suspect_at(d)) for d, m in parsed]
        self._pipeline.hooks.before_claim(parsed)
        claims = await self._claimer.claim(asks)
        if claims is None:
            for delivery, _ in parsed:
                self._settle(delivery, Outcome.REQUEUE)
            return
        await self._act([Claimed(d, m, c) for (d, m), c in zip(parsed, claims, strict=True)])

    def _verdict_of(self, delivery: Delivery, claim: ClaimResult) -> Triage:
        return triage(
            claim,
            attempts=attempts_of(delivery),
            seen_before=seen_before(delivery),
            max_attempts=self._limits.max_attempts,
        )

    async def _act(self, items: Sequence[Claimed]) -> None:
        """Act on the triage of each claimed delivery: the claimed ones are worked on together."""
        batch: list[Work] = []
        steps: list[Coroutine[Any, Any, None]] = []
        self._pipeline.hooks.claimed(items)
        for item in items:
            verdict, attempt = self._verdict_of(item.delivery, item.claim)
            if verdict is Verdict.WORK:
                batch.append(Work(item.delivery, item.message, item.claim.token, attempt))
            elif verdict is Verdict.DUPLICATE or verdict is Verdict.DONE_AGAIN:
                self._act_on_done(item, verdict)
            elif verdict is Verdict.BUSY or verdict is Verdict.SUSPECT:
                self._followups.follow(item)
            elif verdict is Verdict.EXHAUSTED:
                exhausted = self._failures.exhausted(item.delivery, attempt)
                steps.append(self._finish(item.delivery, exhausted, item.message.message_id))
            else:  # Verdict.OVER_LIMIT
                work = Work(item.delivery, item.message, item.claim.token, attempt)
                over_limit = self._failures.over_limit(work)
                steps.append(self._finish(item.delivery, over_limit, item.message.message_id))
        if batch:
            steps.append(self._work(batch))
        await run_all(steps)

    def _act_on_done(self, item: Claimed, verdict: Verdict) -> None:
        """An ID already processed: count it (a duplicate, or a redelivery of a done one), ack."""
        self._local_work.finished(item.message.message_id)
        again = verdict is Verdict.DONE_AGAIN
        counter = CounterName.REDELIVERED_DONE if again else CounterName.DUPLICATES
        self._pipeline.hooks.on_duplicate(item, again)
        self._counters.record(counter, in_redis=item.claim.in_redis)
        log.debug("duplicate_skipped", message_id=item.message.message_id, redelivered=again)
        self._settle(item.delivery, Outcome.ACK)

    async def _work(self, batch: list[Work]) -> None:
        """Work on ``batch`` through the pipeline and settle each of its deliveries once."""
        finished = None
        self._working += len(batch)
        try:
            finished = await self._pipeline.work(batch)
        except Exception:
            log.exception("message_handling_failed")
            await self._stopping.pause(REQUEUE_PAUSE_S)  # requeued at once, they could come back
        finally:
            self._working -= len(batch)
            for i, work in enumerate(batch):
                if finished is not None and finished[i].done:
                    self._local_work.finished(work.message.message_id)
                if finished is not None and finished[i].held:
                    self._followups.held(work.delivery)
                    continue
                self._settle(work.delivery, finished[i].outcome if finished else Outcome.REQUEUE)

    async def drain(self, timeout_s: float) -> bool:
        """Let messages in progress finish; those waiting on a busy claim (or held) give up at
        once. Those not finished by ``timeout_s`` are abandoned: the broker redelivers them."""
        self._stopping.set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self._inbox or self._passes or self._followups.tasks:
            self._start_passes()
            pending = self._passes | self._followups.tasks
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            if pending:
                await asyncio.wait(pending, timeout=remaining)
            else:
                await asyncio.sleep(0)
        abandoned = self._passes | self._followups.tasks
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
