"""Deliveries whose claim did not resolve at once: busy IDs are waited for, suspects isolated.

A delivery whose ID another live replica holds is not acknowledged as a duplicate: the owner may
die, and then its copy is the one RabbitMQ redelivers. The delivery is held and claimed again
with backoff (never longer than the owner's remaining lease) until the claim resolves. A suspect
is claimed again when it can be worked on alone (``worker.processing.isolation``). Either way,
what the claim resolved to is handed back to the inbox's one place that acts on claims, as a
batch of one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from structlog.contextvars import bound_contextvars

from worker.amqp.acks import Outcome
from worker.amqp.broker import attempt_of
from worker.amqp.delivery import Delivery
from worker.claims.protocol import ClaimAsk, ClaimResult, ClaimStatus
from worker.core.models import ChatMessage
from worker.processing.claiming import Claimer
from worker.processing.failures import REQUEUE_PAUSE_S
from worker.processing.isolation import Isolation
from worker.processing.stopping import Stopping
from worker.processing.work import Claimed

log = structlog.get_logger("worker.processing.followups")

BUSY_POLL_MIN_S = 0.02
BUSY_POLL_MAX_S = 0.5

Act = Callable[[Sequence[Claimed]], Awaitable[None]]


def seen_before(delivery: Delivery) -> bool:
    """A redelivery, or a retry's copy: a done ID then is not a duplicate the producer sent."""
    return bool(delivery.redelivered) or attempt_of(delivery) > 1


def suspect_at(delivery: Delivery) -> int:
    """Attempts started from which the message is a suspect: two more than the header records
    as ended (``attempt - 1`` failed and were retried), so two vanished with their replica."""
    return attempt_of(delivery) + 1


@dataclass(slots=True)
class FollowUps:
    """Resolves busy and suspect claims, each in a task of its own, so that a pass can end.

    ``act`` is the inbox's one place that acts on claims; ``settle_if_open`` requeues a delivery
    nothing settled (the replica stopped, or its channel closed).
    """

    claimer: Claimer
    isolation: Isolation
    stopping: Stopping
    act: Act
    settle_if_open: Callable[[Delivery, Outcome], None]
    hold: Callable[[Delivery], Awaitable[Outcome]]  # a delivery held while the classifier pauses
    tasks: set[asyncio.Task[None]] = field(default_factory=set, init=False)
    claiming: int = field(default=0, init=False)  # claim calls of busy waits in flight

    def follow(self, item: Claimed) -> None:
        self._spawn(self._resolve(item))

    def held(self, delivery: Delivery) -> None:
        """Hold a delivery the paused classifier refused, in a task, so that its pass can end."""
        self._spawn(self._held(delivery))

    def _spawn(self, step: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(step)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _held(self, delivery: Delivery) -> None:
        outcome = Outcome.REQUEUE
        try:
            outcome = await self.hold(delivery)
        except Exception:
            log.exception("message_handling_failed")
        finally:
            self.settle_if_open(delivery, outcome)

    async def _resolve(self, item: Claimed) -> None:
        """Wait out a busy claim, then act on what it became. Requeued if the replica stops or
        the delivery's channel closes meanwhile."""
        delivery, message, claim = item
        with bound_contextvars(message_id=message.message_id):
            try:
                if claim.status is ClaimStatus.BUSY:
                    resolved = await self._wait_while_busy(item)
                else:
                    resolved = claim
                if resolved is not None and resolved.status is ClaimStatus.SUSPECT:
                    log.info("suspect_isolated", attempts_started=resolved.attempt)
                    await self._alone(delivery, message)
                elif resolved is not None:
                    await self.act([Claimed(delivery, message, resolved)])
            except Exception:
                log.exception("message_handling_failed")
                await self.stopping.pause(REQUEUE_PAUSE_S)
            finally:
                self.settle_if_open(delivery, Outcome.REQUEUE)

    async def _wait_while_busy(self, item: Claimed) -> ClaimResult | None:
        """Claim again with backoff while another replica holds the ID; ``None`` if we stop
        meanwhile, or the delivery's channel closed (the broker redelivers it: claimed and
        counted then)."""
        delivery = item.delivery
        ask = ClaimAsk(item.message.message_id, seen_before(delivery), suspect_at(delivery))
        delay_s = BUSY_POLL_MIN_S
        retry_after_s = item.claim.retry_after_s
        while True:
            delay_s = min(delay_s, max(retry_after_s, BUSY_POLL_MIN_S))
            if await self.stopping.pause(delay_s) or delivery.stale:
                return None
            delay_s = min(delay_s * 2, BUSY_POLL_MAX_S)
            if not self.isolation.open:  # a suspect is being worked on alone
                continue
            self.claiming += 1
            try:
                claim = await self._claim_one(ask, delivery)
            finally:
                self.claiming -= 1
            if claim is None or claim.status is not ClaimStatus.BUSY:
                return claim
            retry_after_s = claim.retry_after_s

    async def _claim_one(self, ask: ClaimAsk, delivery: Delivery) -> ClaimResult | None:
        claims = await self.claimer.claim([ask], given_up=lambda: delivery.stale)
        return None if claims is None else claims[0]

    async def _alone(self, delivery: Delivery, message: ChatMessage) -> None:
        """Claim and work on a suspect with nothing else claimed or in work in this replica."""
        ask = ClaimAsk(message.message_id, seen_before(delivery))
        delay_s = BUSY_POLL_MIN_S
        async with self.isolation.alone():
            while await self.isolation.isolate() and not delivery.stale:
                claim = await self._claim_one(ask, delivery)
                if claim is None:
                    return
                if claim.status is not ClaimStatus.BUSY:
                    with bound_contextvars(alone=True):
                        await self.act([Claimed(delivery, message, claim)])
                    return
                # Another replica holds it (maybe a dead one, until its lease lapses): let the
                # other messages flow meanwhile.
                self.isolation.reopen()
                if await self.stopping.pause(delay_s):
                    return
                retry_after_s = max(claim.retry_after_s, BUSY_POLL_MIN_S)
                delay_s = min(delay_s * 2, BUSY_POLL_MAX_S, retry_after_s)
