"""How many LLM calls a replica has in flight: a window that grows while the server answers and
shrinks to one call as soon as it fails (slow start and multiplicative decrease, as TCP does).

Without it, a replica handed a prefetch-worth of new texts sends them all at once (up to its
connection limit) before the first answer can tell it that the server is down: 64 failed requests
per replica before the circuit breaker could open. With it, a cold or failing replica sends
``INITIAL_WINDOW`` calls, then one more per answer (doubling per round trip) up to the connection
limit; a provider failure brings it back to one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final

INITIAL_WINDOW: Final = 4


class CallWindow:
    """``async with window.slot():`` around one call; ``succeeded()``/``failed()`` after it."""

    def __init__(self, ceiling: int, initial: int = INITIAL_WINDOW) -> None:
        self.ceiling = max(1, ceiling)
        self.limit = min(self.ceiling, max(1, initial))
        self.in_flight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        while self.in_flight >= self.limit:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
                if waiter.done() and not waiter.cancelled():
                    self._wake()  # woken, then cancelled: pass the turn on
                raise
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1
            self._wake()

    def succeeded(self) -> None:
        if self.limit < self.ceiling:
            self.limit += 1
            self._wake()

    def failed(self) -> None:
        self.limit = 1

    def _wake(self) -> None:
        free = self.limit - self.in_flight
        while free > 0 and self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                free -= 1
