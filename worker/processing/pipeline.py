"""The work on claimed messages: classify through the cache, publish, complete.

Every claimed message takes this path, whether it comes with a pass of hundreds or alone (after a
busy claim resolved, or as a suspect): a batch of one is a batch. A batch works under one lease
deadline (the earliest of its leases), with one classification call, one socket write of results
and one completion script. A message that fails on the way is released and retried (or
dead-lettered) on its own. Nothing is acknowledged before what it stands for is durable: a result
is confirmed by the broker before the done marker is written, and the done marker is written
before the acknowledgement.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import structlog
from structlog.contextvars import bound_contextvars

from worker.amqp.acks import Outcome
from worker.amqp.broker import publish_failed
from worker.claims.leases import LeaseKeeper
from worker.claims.protocol import ClaimStore, CompleteStatus, Completion, Lease
from worker.classification.cached import CachedClassifier, Classified
from worker.core.errors import PermanentError
from worker.observability.counters import Counters
from worker.observability.metrics import CounterName
from worker.processing.failures import Failures
from worker.processing.hooks import Hooks
from worker.processing.work import Outbox, Work

log = structlog.get_logger("worker.processing.pipeline")

# A message of a batch whose work has not reached its end (its lease deadline passed before).
UNFINISHED: BaseException = TimeoutError("the work did not finish")

Produced = Classified | BaseException


class Finished(NamedTuple):
    """How one message of a batch is to be settled; ``done``: its done marker is written;
    ``held``: not yet, the classifier is paused (``Failures.hold`` settles it later)."""

    outcome: Outcome
    done: bool = False
    held: bool = False


@dataclass(frozen=True, slots=True)
class Pipeline:
    """Works on batches of claimed messages; see the module docstring. ``hooks`` are the
    steps of the messages' path (the inbox calls those of the claims)."""

    outbox: Outbox
    claims: ClaimStore
    leases: LeaseKeeper
    classifier: CachedClassifier
    failures: Failures
    counters: Counters
    hooks: Hooks

    async def work(self, batch: Sequence[Work]) -> list[Finished]:
        """Work on ``batch``; how each of its deliveries is to be settled, in order."""
        started = time.perf_counter()
        for item in batch:
            self.hooks.before_process(item.message.message_id)
        produced = await self._produce(batch)
        finished = [Finished(Outcome.REQUEUE)] * len(batch)
        published = [i for i, p in enumerate(produced) if not isinstance(p, BaseException)]
        await self._complete(batch, produced, published, finished, started)
        failed = [(i, p) for i, p in enumerate(produced) if isinstance(p, BaseException)]
        if failed:
            handled = await asyncio.gather(
                *(self._failed(batch[i], exc) for i, exc in failed), return_exceptions=True
            )
            for (i, _), outcome in zip(failed, handled, strict=True):
                if isinstance(outcome, Outcome):
                    finished[i] = Finished(outcome)
                elif outcome is None:
                    finished[i] = Finished(Outcome.REQUEUE, held=True)
                else:
                    log.error("message_handling_failed", exc_info=outcome)
        return finished

    async def _complete(
        self,
        batch: Sequence[Work],
        produced: Sequence[Produced],
        published: Sequence[int],
        finished: list[Finished],
        started: float,
    ) -> None:
        """Write the completions of the messages whose results are confirmed, and count them."""
        if not published:
            return
        self.hooks.published(batch, published)
        for i in published:
            self.hooks.after_publish(batch[i].message.message_id)
        cached = [_cached(produced[i]) for i in published]
        statuses = await self.claims.complete_many(
            [
                Completion(batch[i].message.message_id, batch[i].token, hit)
                for i, hit in zip(published, cached, strict=True)
            ]
        )
        for i, status in zip(published, statuses, strict=True):
            self.hooks.after_complete(batch[i].message.message_id)
            finished[i] = Finished(Outcome.ACK, done=status is not CompleteStatus.LOST)
        self._count_completed(
            [batch[i].message.message_id for i in published], statuses, cached, started
        )

    async def _failed(self, work: Work, exc: BaseException) -> Outcome | None:
        with bound_contextvars(message_id=work.message.message_id, attempt=work.attempt):
            return await self.failures.failed(work, exc)

    async def _produce(self, batch: Sequence[Work]) -> list[Produced]:
        """Classify and publish the batch's results under its leases: per message, the
        classification once the broker confirmed its result, or why it did not get there."""
        produced: list[Produced] = [UNFINISHED] * len(batch)
        confirms: dict[int, asyncio.Future[object]] = {}
        leases = [Lease(w.message.message_id, w.token) for w in batch]
        try:
            async with self.leases.working_many(leases):
                await self._classify_and_queue(batch, produced, confirms)
                if confirms:
                    await asyncio.wait(confirms.values())
        except TimeoutError as exc:  # the lease deadline: what is not confirmed by now fails
            _time_out(produced, confirms, exc)
        for i, confirm in confirms.items():
            if not _confirmed(confirm):
                produced[i] = _why_unconfirmed(confirm)
        return produced

    async def _classify_and_queue(
        self,
        batch: Sequence[Work],
        produced: list[Produced],
        confirms: dict[int, asyncio.Future[object]],
    ) -> None:
        """Classify the batch's texts in one call and queue each result that has one."""
        asked: list[int] = []
        for i, work in enumerate(batch):
            try:
                self.hooks.before_classify(work.message.message_id)
            except Exception as exc:
                produced[i] = exc
            else:
                asked.append(i)
        started_ns = time.time_ns()
        answers = await self.classifier.classify_many([batch[i].message.text for i in asked])
        self.hooks.classified(batch, asked, answers, started_ns)
        for i, answer in zip(asked, answers, strict=True):
            if isinstance(answer, BaseException):
                produced[i] = answer
                continue
            try:
                headers = self.hooks.result_headers(batch[i])
                confirms[i] = self.outbox.queue_result(batch[i].message, *answer, headers)
            except PermanentError as exc:
                produced[i] = exc
            else:
                produced[i] = answer

    def _count_completed(
        self,
        message_ids: Sequence[str],
        statuses: Sequence[CompleteStatus],
        cached: Sequence[bool],
        started: float,
    ) -> None:
        """Count messages whose results are published and whose completions ran (all of them
        are acked), in one call per counter."""
        processed = {True: 0, False: 0}  # by in_redis
        hits = {True: 0, False: 0}
        for message_id, status, hit in zip(message_ids, statuses, cached, strict=True):
            if status is CompleteStatus.LOST:
                # Our lease lapsed and another replica owns the ID now: it finishes and counts it.
                self.counters.record(CounterName.CLAIMS_LOST)
                log.warning("claim_lost_before_completion", message_id=message_id)
                continue
            in_redis = status is CompleteStatus.IN_REDIS or status is CompleteStatus.DEFERRED
            processed[in_redis] += 1
            hits[in_redis] += hit
            log.debug("message_processed", message_id=message_id, cached=hit)
        for in_redis in (True, False):
            self._count(processed[in_redis], hits[in_redis], in_redis)
        if done := processed[True] + processed[False]:
            self.counters.latency.observe(time.perf_counter() - started, done)

    def _count(self, processed: int, hits: int, in_redis: bool) -> None:
        if not processed:
            return
        self.counters.record(CounterName.PROCESSED, processed, in_redis=in_redis)
        if hits:
            self.counters.record(CounterName.CACHE_HITS, hits, in_redis=in_redis)
        if misses := processed - hits:
            self.counters.record(CounterName.CACHE_MISSES, misses, in_redis=in_redis)


def _cached(produced: Produced) -> bool:
    return not isinstance(produced, BaseException) and produced[1]


def _confirmed(future: asyncio.Future[object]) -> bool:
    return future.done() and not future.cancelled() and future.exception() is None


def _retrieve(future: asyncio.Future[object]) -> None:
    if not future.cancelled():
        future.exception()


def _time_out(
    produced: list[Produced], confirms: dict[int, asyncio.Future[object]], exc: TimeoutError
) -> None:
    """The lease deadline passed: every message not finished or not confirmed by now fails."""
    for i, so_far in enumerate(produced):
        if so_far is UNFINISHED or (i in confirms and not _confirmed(confirms[i])):
            produced[i] = exc
            if i in confirms:  # its confirm may still come (or fail): nobody reads it
                confirms.pop(i).add_done_callback(_retrieve)


def _why_unconfirmed(confirm: asyncio.Future[object]) -> BaseException:
    """Whatever ended a confirm that did not succeed (a nack, the channel closing under it,
    with an exception of any type, or a cancellation): the result is not known to be published."""
    error = None if confirm.cancelled() else confirm.exception()
    if isinstance(error, PermanentError):
        return error
    return publish_failed(error or asyncio.CancelledError())
