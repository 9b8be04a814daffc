"""What the worker declares and how it marks messages: queue names, headers, attempt numbers.

Topology (all durable; queues of ``QUEUE_TYPE`` when the worker creates them):
- ``INPUT_QUEUE``: the messages, consumed by every replica; what the broker drops from it (a
  delivery limit, a policy's max-length, an expired message) it dead-letters to
  ``DEAD_LETTER_QUEUE`` with its ``x-death``;
- ``RESULTS_EXCHANGE`` (topic): one result per unique message, routing key = the label; its
  alternate exchange ``{RESULTS_EXCHANGE}.unrouted`` (fanout) keeps a result no binding takes in
  the queue of the same name (unless ``RESULTS_UNROUTED=discard``);
- ``DEAD_LETTER_QUEUE``: messages that cannot be processed, with ``x-death-reason`` and detail;
- ``{INPUT_QUEUE}.retry.{delay}ms``: one holding queue per retry delay; a message waits there for
  its TTL, then RabbitMQ dead-letters it back to the input queue (no hot requeue loop).

Quorum queues the worker creates dead-letter at least once (``x-dead-letter-strategy``, which needs
``x-overflow: reject-publish``): a message on its way to its dead-letter target is not lost when the
queue's leader changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from worker.core.settings import UNROUTED_SUFFIX, Settings

if TYPE_CHECKING:
    from worker.amqp.delivery import Delivery

ATTEMPT_HEADER = "x-neiromatrius-attempt"
REASON_HEADER = "x-death-reason"
DETAIL_HEADER = "x-death-detail"
MAX_ATTEMPT_HEADER = 1_000  # a forged attempt header must not make the delay computation explode
DROPPED_HEADERS_HEADER = "x-neiromatrius-dropped-headers"
# A quorum queue's count of earlier deliveries of this message that were not acknowledged.
DELIVERY_COUNT_HEADER = "x-delivery-count"

Arguments = dict[str, str | int]


@dataclass(frozen=True, slots=True)
class Topology:
    input_queue: str
    results_exchange: str
    dead_letter_queue: str
    retry_base_delay_s: float
    max_attempts: int
    queue_type: str = "classic"
    keep_unrouted: bool = True

    @classmethod
    def of(cls, settings: Settings) -> Topology:
        """The topology a deployment's settings name."""
        return cls(
            input_queue=settings.input_queue,
            results_exchange=settings.results_exchange,
            dead_letter_queue=settings.dead_letter_queue,
            retry_base_delay_s=settings.retry_base_delay_s,
            max_attempts=settings.max_attempts,
            queue_type=settings.queue_type,
            keep_unrouted=settings.results_unrouted == "keep",
        )

    @property
    def unrouted(self) -> str:
        """The alternate exchange of ``RESULTS_EXCHANGE`` and its queue (one name for both)."""
        return self.results_exchange + UNROUTED_SUFFIX

    def _typed(self, dead_letter_to: str | None = None) -> Arguments:
        arguments: Arguments = {"x-queue-type": self.queue_type}
        if dead_letter_to is not None:
            arguments |= {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": dead_letter_to}
            if self.queue_type == "quorum":
                arguments |= {"x-dead-letter-strategy": "at-least-once"}
                arguments |= {"x-overflow": "reject-publish"}
        return arguments

    def input_arguments(self) -> Arguments:
        """``INPUT_QUEUE``'s, when the worker (a replica or ``publish``) creates it."""
        return self._typed(dead_letter_to=self.dead_letter_queue)

    def plain_arguments(self) -> Arguments:
        """The dead-letter and unrouted queues': only their type."""
        return self._typed()

    def retry_arguments(self, attempt: int) -> Arguments:
        return {
            **self._typed(dead_letter_to=self.input_queue),
            "x-message-ttl": self.retry_delay_ms(attempt),
        }

    def results_arguments(self) -> Arguments:
        """``RESULTS_EXCHANGE``'s: its alternate exchange, unless unrouted results are dropped."""
        return {"alternate-exchange": self.unrouted} if self.keep_unrouted else {}

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


def attempts_of(message: Delivery) -> Attempts:
    """Its attempt header and, from a quorum queue, the broker's count of its earlier deliveries."""
    count = (message.headers or {}).get(DELIVERY_COUNT_HEADER, 0)
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        count = 0
    return Attempts(attempt_of(message), min(count, MAX_ATTEMPT_HEADER))


class Attempts(NamedTuple):
    """``header``: the attempt our retry copies carry; ``returned``: how often the broker took
    this delivery back unacknowledged (a crash, a lost channel, a requeue), quorum queues only."""

    header: int
    returned: int = 0
