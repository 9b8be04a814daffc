"""Acknowledgements, batched without ever acknowledging a delivery that is still in flight.

Deliveries are tracked in the order they arrive (delivery tags grow per channel). When messages
settle, one flush sends a single ``basic.ack(multiple=True)`` for the longest settled run at the
front of the channel's window; a settled delivery stuck behind one still in flight is acknowledged
on its own, so a slow message never holds the prefetch window of the others. Deliveries of a
channel that has closed are forgotten: the broker redelivers them.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable
from enum import Enum
from typing import Protocol

import structlog

log = structlog.get_logger("worker.acks")


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
    __slots__ = ("channel", "tags")

    def __init__(self, channel: AckChannel) -> None:
        self.channel = channel
        self.tags: OrderedDict[int, Outcome | None] = OrderedDict()


class Acker:
    """Collects settlements and sends them in as few frames as the in-flight set allows."""

    def __init__(self) -> None:
        self._windows: dict[int, _Window] = {}
        self._flush_scheduled = False
        self._flushing: asyncio.Task[None] | None = None

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

    async def flush(self) -> None:
        """Send what is settled now."""
        for key, window in list(self._windows.items()):
            if window.channel.is_closed:
                del self._windows[key]
                continue
            try:
                await self._flush_window(window)
            except Exception as exc:  # the channel died under us: the broker redelivers
                log.warning("ack_flush_failed", error=type(exc).__name__)
                del self._windows[key]
                continue
            if not window.tags and window.channel.is_closed:
                del self._windows[key]

    async def _flush_window(self, window: _Window) -> None:
        tags = window.tags
        ack_upto: int | None = None
        while tags:
            tag, outcome = next(iter(tags.items()))
            if outcome is None:
                break
            del tags[tag]
            if outcome is Outcome.ACK:
                ack_upto = tag
                continue
            if ack_upto is not None:
                await self._send_ack(window.channel, ack_upto, multiple=True)
                ack_upto = None
            await self._send_nack(window.channel, tag)
        if ack_upto is not None:
            await self._send_ack(window.channel, ack_upto, multiple=True)
        for tag, outcome in [(t, o) for t, o in tags.items() if o is not None]:
            del tags[tag]
            if outcome is Outcome.ACK:
                await self._send_ack(window.channel, tag, multiple=False)
            else:
                await self._send_nack(window.channel, tag)

    # Frames are queued for the connection's writer without waiting for each to be written: the
    # queue keeps them in order, and one lost with the connection is redelivered by the broker.
    async def _send_ack(self, channel: AckChannel, tag: int, *, multiple: bool) -> None:
        await channel.basic_ack(tag, multiple=multiple, wait=False)

    async def _send_nack(self, channel: AckChannel, tag: int) -> None:
        await channel.basic_nack(tag, multiple=False, requeue=True, wait=False)

    async def drain(self) -> None:
        """Flush until nothing settled is left (used at shutdown)."""
        if self._flushing is not None:
            await asyncio.gather(self._flushing, return_exceptions=True)
        await self.flush()
