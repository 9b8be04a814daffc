"""Results out: published with confirms, in the order they were queued, either way.

``ResultOut.publish`` queues a result and returns a future that resolves when the broker confirms
it (or fails if the broker rejects it or the channel closes first); one flush per event-loop turn
sends what that turn queued. With the fast path active (``worker.amqp.fastpath``) the flush is
one socket write for the whole batch (``worker.amqp.fastpath.publishing``); on the stock
libraries each result is aiormq's own ``basic_publish`` with confirms, started in queue order (the
channel lock keeps that order). A result is never taken as published before the broker has it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiormq import Channel
from pamqp.commands import Basic

from worker.amqp.fastpath import FastPath, current
from worker.amqp.fastpath.publishing import (
    CONTENT_TYPE,
    MAX_SHORTSTR,
    PERSISTENT,
    DirectPublisher,
    Outgoing,
)
from worker.core.errors import PermanentError


class ResultOut:
    """Publishes results to ``exchange`` with confirms, batched per event-loop turn.

    ``get_channel`` returns the current aiormq channel (in confirm mode); it changes when the
    robust connection reconnects, so it is asked on every flush. ``fast_path`` (by default what
    this process installed) decides whether results go out directly.
    """

    def __init__(
        self,
        get_channel: Callable[[], Awaitable[Channel]],
        exchange: str,
        *,
        app_id: str | None = None,
        fast_path: FastPath | None = None,
    ) -> None:
        self._get_channel = get_channel
        self._exchange = exchange
        self._app_id = app_id
        self._pending: list[Outgoing] = []
        self._tasks: set[asyncio.Future[Any]] = set()
        fast = fast_path or current()
        self._direct = DirectPublisher(exchange, app_id) if fast.active else None

    @property
    def direct(self) -> bool:
        """Whether results leave through the fast path's direct publisher."""
        return self._direct is not None

    def publish(
        self,
        body: bytes,
        routing_key: str,
        message_id: str,
        headers: Mapping[str, str] | None = None,
    ) -> asyncio.Future[object]:
        """Queue one result (with AMQP ``headers``, if any: a trace context); the future
        resolves when the broker confirms it, or raises if the broker rejects it or the channel
        closes first."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[object] = loop.create_future()
        if not self._pending:
            self._keep(loop.create_task(self._flush()))  # after this turn's results are queued
        self._pending.append(Outgoing(body, routing_key, message_id, done, headers))
        return done

    def _keep(self, task: asyncio.Future[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _flush(self) -> None:
        batch, self._pending = self._pending, []
        try:
            channel = await self._get_channel()
            if self._direct is not None:
                await self._direct.write(channel, batch)
            else:
                self._basic_publish(channel, batch)
        except asyncio.CancelledError:
            for item in batch:
                item.done.cancel()
            raise
        except Exception as exc:
            for item in batch:
                if not item.done.done():
                    item.done.set_exception(exc)

    def _basic_publish(self, channel: Channel, batch: list[Outgoing]) -> None:
        """Each result through aiormq's ``basic_publish``, started in order (its tasks take the
        channel lock in the order they start)."""
        for item in batch:
            if len(item.message_id.encode()) > MAX_SHORTSTR:
                item.done.set_exception(
                    PermanentError("the result's message_id cannot be sent over AMQP: too long")
                )
                continue
            properties = Basic.Properties(
                content_type=CONTENT_TYPE.decode(),
                headers=dict(item.headers) if item.headers else None,
                delivery_mode=PERSISTENT,
                message_id=item.message_id,
                app_id=self._app_id,
            )
            sent = asyncio.ensure_future(
                channel.basic_publish(
                    item.body,
                    exchange=self._exchange,
                    routing_key=item.routing_key,
                    properties=properties,
                )
            )
            self._keep(sent)
            sent.add_done_callback(_settle(item.done))


def _settle(done: asyncio.Future[object]) -> Callable[[asyncio.Future[Any]], None]:
    """A callback passing ``basic_publish``'s outcome on to the caller's future."""

    def settled(sent: asyncio.Future[Any]) -> None:
        if done.done():
            return
        if sent.cancelled():
            done.cancel()
        elif (error := sent.exception()) is not None:
            done.set_exception(error)
        else:
            done.set_result(sent.result())

    return settled
