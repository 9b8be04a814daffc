"""The acker batches acknowledgements but never acknowledges a delivery still in flight."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from worker.amqp.acks import Acker, Outcome


class RecordingChannel:
    """A channel that records the frames it is asked to send (the seam ``AckChannel``), and wakes
    a waiting test at every frame and every time the acker looks at it (once or twice a flush)."""

    def __init__(self) -> None:
        self.closed = False
        self.looks = 0
        self.frames: list[tuple[str, int, bool]] = []
        self.activity = asyncio.Event()

    @property
    def is_closed(self) -> bool:
        self.looks += 1
        self.activity.set()
        return self.closed

    async def basic_ack(self, delivery_tag: int, multiple: bool = False, wait: bool = True) -> None:
        self.frames.append(("ack", delivery_tag, multiple))
        self.activity.set()

    async def basic_nack(
        self, delivery_tag: int, multiple: bool = False, requeue: bool = True, wait: bool = True
    ) -> None:
        self.frames.append(("nack", delivery_tag, multiple))
        self.activity.set()

    async def until(self, condition: Callable[[], bool], timeout_s: float = 2.0) -> None:
        """Wait, woken by the channel's activity, until ``condition`` holds."""
        async with asyncio.timeout(timeout_s):
            while not condition():
                self.activity.clear()
                await self.activity.wait()
        await settle_all()  # the flush that woke us runs to its end


def acked_tags(frames: list[tuple[str, int, bool]], tracked: list[int]) -> set[int]:
    """Which tracked tags the frames acknowledge, applying ``multiple`` the way RabbitMQ does."""
    done: set[int] = set()
    for kind, tag, multiple in frames:
        covered = [t for t in tracked if t <= tag and t not in done] if multiple else [tag]
        if kind == "ack":
            done.update(covered)
        else:
            done.add(tag)
    return done


async def settle_all() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_contiguous_settlements_become_one_multiple_ack() -> None:
    """Ten deliveries settled in the same turn cost one ``ack(multiple=True)`` frame."""
    channel, acker = RecordingChannel(), Acker()
    for tag in range(1, 11):
        acker.track(channel, tag)
    for tag in range(1, 11):
        acker.settle(channel, tag, Outcome.ACK)
    await settle_all()
    assert channel.frames == [("ack", 10, True)]


async def test_in_flight_delivery_is_never_covered_by_a_multiple_ack() -> None:
    """With delivery 3 still in flight, 1-2 are acked together and, after the hold, 4-5 one by
    one, never 3."""
    channel, acker = RecordingChannel(), Acker(hold_s=0.05)
    for tag in range(1, 6):
        acker.track(channel, tag)
    for tag in (1, 2, 4, 5):
        acker.settle(channel, tag, Outcome.ACK)
    await settle_all()
    assert channel.frames == [("ack", 2, True)]  # 4 and 5 wait for 3 a little
    await channel.until(lambda: len(channel.frames) >= 3)  # the hold is over: 4 and 5 go alone
    assert 3 not in acked_tags(channel.frames, [1, 2, 3, 4, 5])
    assert acked_tags(channel.frames, [1, 2, 3, 4, 5]) == {1, 2, 4, 5}
    assert ("ack", 2, True) in channel.frames
    assert all(not multiple for _, tag, multiple in channel.frames if tag > 3)
    acker.settle(channel, 3, Outcome.ACK)
    await settle_all()
    assert acked_tags(channel.frames, [1, 2, 3, 4, 5]) == {1, 2, 3, 4, 5}


async def test_requeue_splits_the_run_and_is_sent_alone() -> None:
    """A requeued delivery in the middle of a run is nacked alone; acks around it stay batched."""
    channel, acker = RecordingChannel(), Acker()
    for tag in range(1, 6):
        acker.track(channel, tag)
    for tag in range(1, 6):
        acker.settle(channel, tag, Outcome.REQUEUE if tag == 3 else Outcome.ACK)
    await settle_all()
    assert channel.frames == [("ack", 2, True), ("nack", 3, False), ("ack", 5, True)]


async def test_deliveries_of_a_closed_channel_are_dropped() -> None:
    """After the channel closed, its deliveries are not acknowledged (the broker redelivers them)."""
    channel, acker = RecordingChannel(), Acker()
    acker.track(channel, 1)
    channel.closed = True
    acker.settle(channel, 1, Outcome.ACK)
    await settle_all()
    assert channel.frames == []
    assert acker.unsettled == 0


async def test_deliveries_settled_behind_one_in_flight_join_its_multiple_ack() -> None:
    """When the delivery in front settles within the hold, those behind it cost no frame of their
    own: one multiple ack covers them all."""
    channel, acker = RecordingChannel(), Acker(hold_s=0.2)
    for tag in range(1, 6):
        acker.track(channel, tag)
    for tag in (2, 3, 4, 5):
        acker.settle(channel, tag, Outcome.ACK)
    await settle_all()
    assert channel.frames == []
    acker.settle(channel, 1, Outcome.ACK)
    await settle_all()
    assert channel.frames == [("ack", 5, True)]
    looked = channel.looks
    # The hold's timer flushes again (it looks at the channel): nothing is left for it to send.
    await channel.until(lambda: channel.looks > looked)
    assert channel.frames == [("ack", 5, True)]


async def test_shutdown_sends_what_is_held_at_once() -> None:
    """``drain`` does not hold: a settled delivery behind one in flight is acked alone at once."""
    channel, acker = RecordingChannel(), Acker(hold_s=10)
    for tag in (1, 2):
        acker.track(channel, tag)
    acker.settle(channel, 2, Outcome.ACK)
    await settle_all()
    await acker.drain()
    assert channel.frames == [("ack", 2, False)]
