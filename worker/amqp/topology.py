"""What the worker declares and how it marks messages: queue names, headers, attempt numbers.

Topology (all durable):
- ``INPUT_QUEUE``: the messages, consumed by every replica;
- ``RESULTS_EXCHANGE`` (topic): one result per unique message, routing key = the label;
- ``DEAD_LETTER_QUEUE``: messages that cannot be processed, with ``x-death-reason`` and detail;
- ``{INPUT_QUEUE}.retry.{delay}ms``: one holding queue per retry delay; a message waits there for
  its TTL, then RabbitMQ dead-letters it back to the input queue (no hot requeue loop).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from worker.core.settings import Settings

if TYPE_CHECKING:
    from worker.amqp.delivery import Delivery

ATTEMPT_HEADER = "x-neiromatrius-attempt"
REASON_HEADER = "x-death-reason"
DETAIL_HEADER = "x-death-detail"
MAX_ATTEMPT_HEADER = 1_000  # a forged attempt header must not make the delay computation explode
DROPPED_HEADERS_HEADER = "x-neiromatrius-dropped-headers"


@dataclass(frozen=True, slots=True)
class Topology:
    input_queue: str
    results_exchange: str
    dead_letter_queue: str
    retry_base_delay_s: float
    max_attempts: int

    @classmethod
    def of(cls, settings: Settings) -> Topology:
        """The topology a deployment's settings name."""
        return cls(
            input_queue=settings.input_queue,
            results_exchange=settings.results_exchange,
            dead_letter_queue=settings.dead_letter_queue,
            retry_base_delay_s=settings.retry_base_delay_s,
            max_attempts=settings.max_attempts,
        )

    def retry_delay_ms(self, attempt: int) -> int:
        """Delay before attempt ``attempt + 1``: the base, doubled after each failure, at most 1 h."""
        doublings = min(max(attempt, 1), 64) - 1
        return int(min(self.retry_base_delay_s * 2**doublings, 3_600) * 1000)

    def retry_queue(self, attempt: int) -> str:
        return f"{self.input_queue}.retry.{self.retry_delay_ms(attempt)}ms"


def attempt_of(message: Delivery) -> int:
    """Which attempt this delivery is by its header (1 for a message never retried)."""
    value = (message.headers or {}).get(ATTEMPT_HEADER, 1)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        return 1
    return min(value, MAX_ATTEMPT_HEADER)
