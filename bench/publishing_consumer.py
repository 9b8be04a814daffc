"""The floor of the worker's broker traffic: consume, publish one confirmed result, acknowledge.

Run as a subprocess by ``bench/run.py`` (case g). No parsing, no Redis, no classification: each
delivery's body goes back out as its "result" to ``exchange`` through the worker's own batched
publisher (``worker.amqp.results``), and deliveries are acknowledged with ``multiple=True`` once
their result is confirmed. It consumes through aiormq directly, as the worker does. What it
measures is what any worker publishing one confirmed result per message pays the broker and the
AMQP client, whatever else it does. Prints one JSON line like ``bare_consumer.py``.
"""

from __future__ import annotations

import asyncio
import sys
from collections import deque

import aiormq
from aiormq.abc import DeliveredMessage

from bench.bare_consumer import Window
from worker.amqp import fastpath
from worker.amqp.results import ResultOut


async def main(url: str, queue: str, exchange: str, count: int, prefetch: int) -> None:
    connection = await aiormq.connect(url)
    consuming = await connection.channel()
    await consuming.basic_qos(prefetch_count=prefetch)
    publishing = await connection.channel(publisher_confirms=True)
    await publishing.exchange_declare(exchange, exchange_type="topic", durable=True)
    assert isinstance(publishing, aiormq.Channel)

    async def channel() -> aiormq.Channel:
        return publishing

    out = ResultOut(channel, exchange, fast_path=fastpath.decide())  # as before the switch
    done = asyncio.Event()
    seen = 0
    window = Window()
    in_order: deque[tuple[int, asyncio.Future[object]]] = deque()  # deliveries, in tag order
    acks: set[asyncio.Task[None]] = set()

    def confirmed(_: asyncio.Future[object]) -> None:
        nonlocal seen
        highest = 0
        while in_order and in_order[0][1].done():  # the settled front run, as the worker's acker
            highest = in_order.popleft()[0]
            seen += 1
        if highest:
            ack = asyncio.ensure_future(consuming.basic_ack(highest, multiple=True, wait=False))
            acks.add(ack)
            ack.add_done_callback(acks.discard)
        if seen >= count:
            done.set()

    def on_message(message: DeliveredMessage) -> None:
        window.start()
        future = out.publish(message.body, "result", message.header.properties.message_id or "-")
        in_order.append((message.delivery_tag or 0, future))
        future.add_done_callback(confirmed)

    await consuming.basic_consume(queue, on_message)  # type: ignore[arg-type]  # aiormq wraps it
    await done.wait()
    print(window.report(seen))
    await publishing.exchange_delete(exchange)
    await connection.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])))
