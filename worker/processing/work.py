"""The values a message carries through the processing layer, and what that layer needs of the
broker side (``Outbox``), so that the pipeline can be run against a recording fake."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import NamedTuple, Protocol

from worker.amqp.delivery import Delivery
from worker.claims.protocol import ClaimResult
from worker.classification.classifiers.base import Classification
from worker.core.models import ChatMessage


class Claimed(NamedTuple):
    """A parsed delivery and the store's answer to its claim."""

    delivery: Delivery
    message: ChatMessage
    claim: ClaimResult


class Work(NamedTuple):
    """A message this replica holds the claim of (``token``), on its attempt ``attempt``."""

    delivery: Delivery
    message: ChatMessage
    token: str
    attempt: int


class Outbox(Protocol):
    """Where results, retries and dead letters go (``worker.amqp.broker.Broker``)."""

    def queue_result(
        self,
        message: ChatMessage,
        classification: Classification,
        cached: bool,
        headers: Mapping[str, str] | None = None,
    ) -> asyncio.Future[object]:
        """The result on its way; the future resolves on the broker's confirm. Raises
        ``PermanentError`` at once when it cannot be encoded."""
        ...

    async def dead_letter(
        self, delivery: Delivery, reason: str, detail: str, attempts: int
    ) -> None: ...

    async def schedule_retry(self, delivery: Delivery, attempt: int, error: str) -> None: ...

    async def send_to_back(self, delivery: Delivery) -> None:
        """A copy of ``delivery`` at the back of the input queue, as it is (confirmed)."""
        ...
