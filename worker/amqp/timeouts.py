"""The broker's consumer timeout, told apart from the other ways a consumer's channel closes.

RabbitMQ closes a channel holding a delivery unacknowledged for longer than its
``consumer_timeout`` with ``PRECONDITION_FAILED - delivery acknowledgement on channel N timed
out. Timeout value used: T ms...``. aio-pika's robust channel opens again and consumes again; the
deliveries it held are redelivered (the claims keep them from being processed twice). What the
worker adds: one warning naming the timeout and the settings that bound a delivery's wait, and the
``consumer_timeouts`` counter.
"""

from __future__ import annotations

import re
from typing import Any

import structlog
from aiormq.exceptions import ChannelPreconditionFailed

from worker.observability.counters import Counters
from worker.observability.metrics import CounterName

log = structlog.get_logger("worker.amqp.timeouts")

_TIMED_OUT = re.compile(r"delivery acknowledgement on channel \d+ timed out")
_TIMEOUT_MS = re.compile(r"Timeout value used: (\d+) ms")
FIX = (
    "a delivery stayed unacknowledged longer than the broker's consumer_timeout: raise "
    "consumer_timeout in rabbitmq.conf (or per queue from RabbitMQ 3.12), or lower WORK_TIMEOUT_S "
    "and PREFETCH, and set RABBITMQ_CONSUMER_TIMEOUT_S to the broker's value"
)


def consumer_timeout_ms(exc: BaseException | None) -> int | None:
    """The timeout (ms, ``0`` when unsaid) if ``exc`` is the broker's consumer timeout, else None."""
    if not isinstance(exc, ChannelPreconditionFailed) or not _TIMED_OUT.search(str(exc)):
        return None
    found = _TIMEOUT_MS.search(str(exc))
    return int(found[1]) if found else 0


class ConsumerTimeouts:
    """A close callback for the consumer's channel: warns and counts consumer timeouts."""

    def __init__(self, counters: Counters | None, configured_s: float) -> None:
        self._counters = counters
        self._configured_s = configured_s

    def __call__(self, _channel: Any, exc: BaseException | None = None) -> None:
        timeout_ms = consumer_timeout_ms(exc)
        if timeout_ms is None:
            return
        if self._counters is not None:
            self._counters.record(CounterName.CONSUMER_TIMEOUTS)
        log.warning(
            "broker_consumer_timeout",
            broker_timeout_s=timeout_ms / 1000 if timeout_ms else "unknown",
            configured_timeout_s=self._configured_s,
            fix=FIX,
        )
