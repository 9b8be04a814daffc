"""Watching ``{RESULTS_EXCHANGE}.unrouted``: results no binding took, kept by the alternate exchange.

The broker says nothing to the publisher when the alternate exchange takes a result (a
``mandatory`` publish is not returned then: the alternate exchange counts as a route, see
RabbitMQ's "Alternate Exchanges" guide), so the worker asks the queue how many it holds: a
passive declare every ``interval_s``, on a throwaway channel. When the count grew it warns, at
most once per ``warn_every_s``; the stats and ``/metrics`` read the same count
(``results_unrouted``) when asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import structlog
from aio_pika.abc import AbstractConnection
from aiormq.exceptions import AMQPError

from worker.amqp.declaring import throwaway

log = structlog.get_logger("worker.amqp.unrouted")

CHECK_INTERVAL_S = 10.0
WARN_EVERY_S = 60.0
FIX = (
    "no binding on RESULTS_EXCHANGE takes these results: bind the consumer's queue, then move "
    "what waits here to it (README, 'Unrouted results')"
)


class UnroutedWatch:
    """A background check of the unrouted queue's depth for the life of the replica."""

    def __init__(
        self,
        connection: AbstractConnection,
        queue: str,
        *,
        interval_s: float = CHECK_INTERVAL_S,
        warn_every_s: float = WARN_EVERY_S,
    ) -> None:
        self._connection = connection
        self._queue = queue
        self._interval_s = interval_s
        self._warn_every_s = warn_every_s
        self._task: asyncio.Task[None] | None = None
        self._seen = 0
        self._warned_at: float | None = None
        self.last_error: str | None = None

    async def __aenter__(self) -> UnroutedWatch:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            try:
                self.check(await self._count())
                self.last_error = None
            except (AMQPError, ConnectionError, RuntimeError, TimeoutError) as exc:
                if self.last_error is None:  # the broker is away: the connection says so already
                    log.debug("unrouted_check_failed", error=type(exc).__name__)
                self.last_error = type(exc).__name__
            await asyncio.sleep(self._interval_s)

    async def _count(self) -> int:
        async with throwaway(self._connection) as channel:
            declared = await channel.queue_declare(self._queue, passive=True)
        return declared.message_count or 0

    def check(self, count: int, now: float | None = None) -> bool:
        """Warn if ``count`` grew since the last check and no warning came in the last minute;
        whether it warned."""
        now = time.monotonic() if now is None else now
        grew, self._seen = count > self._seen, count
        if not grew or (self._warned_at is not None and now - self._warned_at < self._warn_every_s):
            return False
        self._warned_at = now
        log.warning("results_unrouted", queue=self._queue, messages=count, fix=FIX)
        return True
