"""Suspects are worked on alone.

A message two of whose attempts vanished (started, never ended: their replicas died) is a
suspect: it may be what kills them, or it may have been in flight with what does. The claim
script reports it instead of claiming it, and suspects are then worked on one at a time and
alone: before one is claimed, no new claim is made and the messages in work finish. A message
that kills its replica then takes only itself down, and only its own attempts run out; the
innocent messages caught with it twice are processed. After a single crash, redeliveries are
processed as usual, in parallel.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from worker.processing.stopping import Stopping

ISOLATION_POLL_S = 0.005


class Isolation:
    """The gate suspects close: while it is closed no pass starts and no busy wait claims.

    ``busy()`` tells whether anything else is still being claimed or worked on (passes running,
    claims of busy waits in flight, messages in work); ``on_reopen`` is called when the gate opens
    again, so that the inbox can start its passes.
    """

    def __init__(
        self, stopping: Stopping, *, busy: Callable[[], bool], on_reopen: Callable[[], None]
    ) -> None:
        self._stopping = stopping
        self._busy = busy
        self._on_reopen = on_reopen
        self._alone = asyncio.Lock()  # suspects, one at a time
        self._open = asyncio.Event()
        self._open.set()

    @property
    def open(self) -> bool:
        return self._open.is_set()

    @contextlib.asynccontextmanager
    async def alone(self) -> AsyncIterator[None]:
        """Hold the suspects' turn; the gate is open again when the block ends."""
        async with self._alone:
            try:
                yield
            finally:
                self.reopen()

    async def isolate(self) -> bool:
        """Close the gate and wait until nothing else is claimed or in work; ``False`` if the
        replica is stopping."""
        self._open.clear()
        while self._busy():
            if await self._stopping.pause(ISOLATION_POLL_S):
                return False
        return True

    def reopen(self) -> None:
        """Let the other messages flow (a suspect waits for a busy claim, or is done)."""
        if self._open.is_set():
            return
        self._open.set()
        self._on_reopen()
