"""The baseline: a bare aio-pika consumer that acknowledges each message and does nothing else.

Run as a subprocess by ``bench/run.py``: consumes ``count`` messages from ``queue`` (prefetch as
given), acknowledging each one on its own, and prints one JSON line with the time from the first
delivery to the last acknowledgement and its peak RSS.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import aio_pika


def peak_rss_kb() -> int:
    """This process's peak resident set (VmHWM: unlike ru_maxrss, not inherited across exec)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


async def main(url: str, queue_name: str, count: int, prefetch: int) -> None:
    connection = await aio_pika.connect_robust(url)
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=prefetch)
    queue = await channel.declare_queue(queue_name, durable=True)
    done = asyncio.Event()
    seen = 0
    first = 0.0
    cpu_first = 0.0

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        nonlocal seen, first, cpu_first
        if seen == 0:
            first = time.perf_counter()
            cpu_first = time.process_time()
        await message.ack()
        seen += 1
        if seen >= count:
            done.set()

    await queue.consume(on_message)
    await done.wait()
    elapsed = time.perf_counter() - first
    cpu_seconds = time.process_time() - cpu_first
    peak_kb = peak_rss_kb()
    report = {"messages": seen, "seconds": elapsed, "cpu_seconds": cpu_seconds}
    print(json.dumps({**report, "peak_rss_mb": peak_kb / 1024}))
    await connection.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
