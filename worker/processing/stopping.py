"""The replica's stop signal, and the one way the processing layer waits: a pause a stop cuts short."""

from __future__ import annotations

import asyncio


class Stopping:
    """Set once the replica stops taking work; every wait of the processing layer ends then."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    async def pause(self, seconds: float) -> bool:
        """Wait ``seconds``, or less if the replica is stopping; ``True`` when it is."""
        if self._event.is_set():
            return True
        try:
            await asyncio.wait_for(self._event.wait(), timeout=seconds)
        except TimeoutError:
            return False
        return True
