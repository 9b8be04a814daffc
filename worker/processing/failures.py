"""What becomes of a message that cannot be processed: dead-lettered with its reason, or parked
in a retry queue for a later attempt, its claim released first.

A publish of the dead letter or the retry copy that fails (the broker is away) requeues the
delivery after ``REQUEUE_PAUSE_S``, so that it cannot come straight back in a hot loop.

A message the classifier's open circuit breaker refused is held instead (``triage.after_failure``):
its claim is released with the attempt given back, and the delivery waits unacknowledged while the
breaker stays open, for at most ``LLM_BREAKER_HOLD_S``. If the breaker closes meanwhile it is
requeued, and classified at once; if not, a copy goes to the back of the input queue (confirmed,
then the delivery is acked) so that the prefetch window cannot fill up with held messages: the
deliveries behind them, cache hits among them, keep flowing, and the held ones come round again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog

from worker.amqp.acks import Outcome
from worker.amqp.broker import DETAIL_HEADER, attempt_of
from worker.amqp.delivery import Delivery
from worker.claims.protocol import ClaimStore
from worker.core.errors import InvalidMessage, PermanentError, PublishFailed, TransientError
from worker.observability.counters import Counters
from worker.observability.metrics import CounterName
from worker.processing.stopping import Stopping
from worker.processing.triage import AfterFailure, after_failure
from worker.processing.work import Outbox, Work

log = structlog.get_logger("worker.processing.failures")

REQUEUE_PAUSE_S = 1.0
HOLD_POLL_S = 0.25  # how often a held delivery looks whether the breaker closed
EXPECTED_FAILURES = (TransientError, PermanentError, TimeoutError)


class Failures:
    """Dead letters and retries of one replica's messages."""

    def __init__(
        self,
        *,
        outbox: Outbox,
        claims: ClaimStore,
        counters: Counters,
        max_attempts: int,
        stopping: Stopping,
        retry_delay_ms: Callable[[int], int],
        paused: Callable[[], bool] = lambda: False,
        hold_s: float = 5.0,
    ) -> None:
        self._outbox = outbox
        self._claims = claims
        self._counters = counters
        self._max_attempts = max_attempts
        self._pause = stopping.pause
        self._retry_delay_ms = retry_delay_ms
        self._paused = paused
        self._hold_s = hold_s

    async def reject(self, delivery: Delivery, exc: InvalidMessage) -> Outcome:
        return await self.dead_letter(delivery, exc.reason, exc.detail, attempt_of(delivery))

    async def dead_letter(
        self, delivery: Delivery, reason: str, detail: str, attempts: int
    ) -> Outcome:
        """Publish to the dead-letter queue, then ack; if that publish fails, requeue after a pause."""
        log.warning("message_dead_lettered", reason=reason, detail=detail, attempts=attempts)
        try:
            await self._outbox.dead_letter(delivery, reason, detail, attempts)
        except PublishFailed as publish_exc:
            log.warning("dead_letter_publish_failed", error=str(publish_exc))
            await self._pause(REQUEUE_PAUSE_S)
            return Outcome.REQUEUE
        self._counters.record(CounterName.DEAD_LETTERED)
        return Outcome.ACK

    async def failed(self, work: Work, exc: BaseException) -> Outcome | None:
        """Release the claim of a message whose work failed, then retry or dead-letter it;
        ``None`` when it is held (the caller hands its delivery to ``hold``)."""
        if not isinstance(exc, EXPECTED_FAILURES):
            log.error("message_work_failed", exc_info=exc)
        message_id = work.message.message_id
        verdict = after_failure(exc, attempt=work.attempt, max_attempts=self._max_attempts)
        if verdict is AfterFailure.HOLD:
            await self._claims.release(message_id, work.token, refund_attempt=True)
            self._counters.record(CounterName.BREAKER_HELD)
            log.debug("message_held", reason=str(exc))
            return None
        await self._claims.release(message_id, work.token)
        return await self._retry_or_dead_letter(work.delivery, work.attempt, exc)

    async def hold(self, delivery: Delivery) -> Outcome:
        """Hold a delivery while the breaker is open (see the module docstring): requeued when
        it closes or the replica stops, else sent to the back of the input queue."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._hold_s
        while self._paused() and (remaining_s := deadline - loop.time()) > 0:
            if await self._pause(min(HOLD_POLL_S, remaining_s)):
                return Outcome.REQUEUE
        if not self._paused() or delivery.stale:
            return Outcome.REQUEUE
        try:
            await self._outbox.send_to_back(delivery)
        except PublishFailed as publish_exc:
            log.warning("held_publish_failed", error=str(publish_exc))
            return Outcome.REQUEUE
        return Outcome.ACK

    async def over_limit(self, work: Work) -> Outcome:
        """Release a claim whose attempt is past ``MAX_ATTEMPTS`` by its header (the limit was
        lowered), then dead-letter it: ``work.attempt`` attempts were made before."""
        await self._claims.release(work.message.message_id, work.token)
        return await self.exhausted(work.delivery, work.attempt)

    async def exhausted(self, delivery: Delivery, attempts: int) -> Outcome:
        """Dead-letter a message whose attempts were all used up without one finishing."""
        detail = f"{attempts} attempts started, none finished (MAX_ATTEMPTS={self._max_attempts})"
        last_error = (delivery.headers or {}).get(DETAIL_HEADER)
        if isinstance(last_error, str) and last_error:
            detail += f"; last error reported: {last_error}"
        else:
            detail += "; the replicas working on it stopped (crashed or lost the claim)"
        return await self.dead_letter(delivery, "retries_exhausted", detail, attempts)

    async def _retry_or_dead_letter(
        self, delivery: Delivery, attempt: int, exc: BaseException
    ) -> Outcome:
        if isinstance(exc, TimeoutError):
            error = "work timed out or its lease could not be renewed"
        elif isinstance(exc, TransientError | PermanentError):
            error = str(exc)
        else:  # its text may hold anything; the type is what an operator can act on
            error = f"unexpected {type(exc).__name__}"
        self._counters.record(CounterName.FAILED)
        verdict = after_failure(exc, attempt=attempt, max_attempts=self._max_attempts)
        if verdict is AfterFailure.DEAD_LETTER:
            reason = "permanent_error" if isinstance(exc, PermanentError) else "retries_exhausted"
            return await self.dead_letter(delivery, reason, error, attempt)
        try:
            log.warning(
                "message_retry_scheduled",
                error=error,
                delay_ms=self._retry_delay_ms(attempt),
            )
            await self._outbox.schedule_retry(delivery, attempt, error)
            self._counters.record(CounterName.RETRIED)
        except PublishFailed as publish_exc:
            log.warning("retry_publish_failed", error=str(publish_exc))
            await self._pause(REQUEUE_PAUSE_S)
            return Outcome.REQUEUE
        return Outcome.ACK
