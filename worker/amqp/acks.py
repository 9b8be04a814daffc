"""Acknowledgements, batched without ever acknowledging a delivery that is still in flight.

Deliveries are tracked in the order they arrive (delivery tags grow per channel). When messages
settle, one flush sends a single ``basic.ack(multiple=True)`` for the longest settled run at the
front of the channel's window. A settled delivery stuck behind one still in flight waits
``hold_s`` (0.1 s) for the run in front of it to settle, and is then acknowledged on its own: a
slow message never holds the prefetch window of the others for longer than that, and the usual
case (a duplicate acknowledged while the rest of its pass is still being worked on) costs no frame
of its own. Deliveries of a channel that has closed are forgotten: the broker redelivers them.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable
from enum import Enum
from typing import Protocol

import structlog

log = structlog.get_logger("worker.amqp.acks")

HOLD_S = 0.1  # how long a settled delivery waits for those in front of it before going alone


class Outcome(Enum):
    ACK = "ack"
    REQUEUE = "requeue"


class AckChannel(Protocol):
    """The part of an AMQP channel the acker needs (aiormq's channel has it)."""

    @property
    def is_closed(self) -> bool: ...

    def basic_ack(
        self, delivery_tag: int, multiple: bool = False, wait: bool = True
    ) -> Awaitable[None]: ...

    def basic_nack(
        self, delivery_tag: int, multiple: bool = False, requeue: bool = True, wait: bool = True
    ) -> Awaitable[None]: ...


class _Window:
    __slots__ = ("channel", "settled_at", "tags")

    def __init__(self, channel: AckChannel) -> None:
        self.channel = channel
        self.tags: OrderedDict[int, Outcome | None] = OrderedDict()
        self.settled_at: dict[int, float] = {}  # of settled deliveries still waiting


class Acker:
    """Collects settlements and sends them in as few frames as the in-flight set allows."""

    def __init__(self, *, hold_s: float = HOLD_S) -> None:
        self._hold_s = hold_s
        self._windows: dict[int, _Window] = {}
        self._flush_scheduled = False
        self._flushing: asyncio.Task[None] | None = None
        self._recheck: asyncio.TimerHandle | None = None

    def track(self, channel: AckChannel, delivery_tag: int) -> None:
        """Register a delivery as it arrives (call in arrival order)."""
        window = self._windows.get(id(channel))
        if window is None:
            window = self._windows[id(channel)] = _Window(channel)
        window.tags[delivery_tag] = None

    def settle(self, channel: AckChannel, delivery_tag: int, outcome: Outcome) -> None:
        window = self._windows.get(id(channel))
        if window is None or delivery_tag not in window.tags:
            return
        window.tags[delivery_tag] = outcome
        window.settled_at[delivery_tag] = asyncio.get_running_loop().time()
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._start_flush)

    @property
    def unsettled(self) -> int:
        return sum(1 for w in self._windows.values() for o in w.tags.values() if o is None)

    def _start_flush(self) -> None:
        self._flush_scheduled = False
        if self._flushing is not None and not self._flushing.done():
            # One flush at a time keeps frames in tag order; come back when it is over.
            self._flushing.add_done_callback(lambda _: self._reschedule())
            return
        self._flushing = asyncio.get_running_loop().create_task(self.flush())

    def _reschedule(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._start_flush)

    async def flush(self, *, hold: bool = True) -> None:
        """Send what is settled now (all of it when not ``hold``)."""
        for key, window in list(self._windows.items()):
            if window.channel.is_closed:
                del self._windows[key]
                continue
            try:
                await self._flush_window(window, self._hold_s if hold else 0.0)
            except Exception as exc:  # the channel died under us: the broker redelivers
                log.warning("ack_flush_failed", error=type(exc).__name__)
                del self._windows[key]
                continue
            if not window.tags and window.channel.is_closed:
                del self._windows[key]

    async def _flush_window(self, window: _Window, hold_s: float) -> None:
        tags = window.tags
        ack_upto: int | None = None
        while tags:
            tag, outcome = next(iter(tags.items()))
            if outcome is None:
                break
            del tags[tag]
            window.settled_at.pop(tag, None)
            if outcome is Outcome.ACK:
                ack_upto = tag
                continue
            if ack_upto is not None:
                await self._send_ack(window.channel, ack_upto, multiple=True)
                ack_upto = None
            await self._send_nack(window.channel, tag)
        if ack_upto is not None:
            await self._send_ack(window.channel, ack_upto, multiple=True)
        if window.settled_at:
            await self._flush_overdue(window, hold_s)

    async def _flush_overdue(self, window: _Window, hold_s: float) -> None:
        """Settled, behind a delivery still in flight: alone, once they have waited long enough."""
        tags = window.tags
        due = asyncio.get_running_loop().time() - hold_s
        for tag, settled_at in list(window.settled_at.items()):
            if settled_at > due:
                continue
            del window.settled_at[tag]
            outcome = tags.pop(tag)
            if outcome is Outcome.ACK:
                await self._send_ack(window.channel, tag, multiple=False)
            else:
                await self._send_nack(window.channel, tag)
        if window.settled_at and self._recheck is None:
            self._recheck = asyncio.get_running_loop().call_later(self._hold_s, self._rechecked)

    def _rechecked(self) -> None:
        self._recheck = None
        self._reschedule()

    # Frames are queued for the connection's writer without waiting for each to be written: the
    # queue keeps them in order, and one lost with the connection is redelivered by the broker.
    async def _send_ack(self, channel: AckChannel, tag: int, *, multiple: bool) -> None:
        await channel.basic_ack(tag, multiple=multiple, wait=False)

    async def _send_nack(self, channel: AckChannel, tag: int) -> None:
        await channel.basic_nack(tag, multiple=False, requeue=True, wait=False)

    async def drain(self) -> None:
        """Flush until nothing settled is left (used at shutdown)."""
        if self._recheck is not None:
            self._recheck.cancel()
            self._recheck = None
        if self._flushing is not None:
            await asyncio.gather(self._flushing, return_exceptions=True)
        await self.flush(hold=False)
