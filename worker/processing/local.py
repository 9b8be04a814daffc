"""Copies of an ID that arrive while this replica works on it wait for that work here.

Asking Redis about them would only answer "busy" (this replica holds the claim) and start a
busy wait; instead each copy waits for the work on its ID in this process: once that finished
(its done marker is written) the copy is done too; if the pass ended without that, the copy is
claimed as any delivery is.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from functools import partial

from worker.amqp.delivery import Delivery
from worker.core.models import ChatMessage

Parsed = tuple[Delivery, ChatMessage]
# Called for a copy once the work it waited for ended: ``True`` if that work finished.
OnCopy = Callable[[Delivery, ChatMessage, bool], None]


class LocalWork:
    """The IDs of this replica's passes, each with the future its copies wait on."""

    def __init__(self, on_copy: OnCopy) -> None:
        self._on_copy = on_copy
        self._work: dict[str, asyncio.Future[bool]] = {}

    def take(self, parsed: Sequence[Parsed]) -> list[Parsed]:
        """The deliveries whose IDs are not in work here (now they are); each other one waits."""
        firsts: list[Parsed] = []
        for delivery, message in parsed:
            earlier = self._work.get(message.message_id)
            if earlier is None:
                self._work[message.message_id] = asyncio.get_running_loop().create_future()
                firsts.append((delivery, message))
            else:
                earlier.add_done_callback(partial(self._ended, delivery, message))
        return firsts

    def finished(self, message_id: str) -> None:
        """The work on ``message_id`` finished: copies waiting on it are done now."""
        work = self._work.get(message_id)
        if work is not None and not work.done():
            work.set_result(True)

    def release(self, firsts: Sequence[Parsed]) -> None:
        """The pass of ``firsts`` ended: copies still waiting on them are claimed as usual."""
        for _, message in firsts:
            ended = self._work.pop(message.message_id)
            if not ended.done():
                ended.set_result(False)

    def _ended(self, delivery: Delivery, message: ChatMessage, work: asyncio.Future[bool]) -> None:
        self._on_copy(delivery, message, work.result())
