"""The baseline: a bare aio-pika consumer that acknowledges each message and does nothing else.

Run as a subprocess by ``bench/run.py``: consumes ``count`` messages from ``queue`` (prefetch as
given), acknowledging each one on its own, and prints one JSON line with the time from the first
delivery to the last acknowledgement, the CPU time spent in it, and its peak RSS.
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


class Window:
    """The measured window: from the first delivery to the end, in wall-clock and CPU time."""

    def __init__(self) -> None:
        self.first = 0.0
        self.cpu_first = 0.0

    def start(self) -> None:
        """Mark the first delivery (later calls change nothing)."""
        if not self.first:
            self.first = time.perf_counter()
            self.cpu_first = time.process_time()

    def report(self, messages: int) -> str:
        """The JSON line ``bench/run.py`` reads: messages, seconds, CPU seconds, peak RSS."""
        return json.dumps(
            {
                "messages": messages,
                "seconds": time.perf_counter() - self.first,
                "cpu_seconds": time.process_time() - self.cpu_first,
                "peak_rss_mb": peak_rss_kb() / 1024,
            }
        )


async def main(url: str, queue_name: str, count: int, prefetch: int) -> None:
    connection = await aio_pika.connect_robust(url)
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=prefetch)
    queue = await channel.declare_queue(queue_name, durable=True)
    done = asyncio.Event()
    seen = 0
    window = Window()

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        nonlocal seen
        window.start()
        await message.ack()
        seen += 1
        if seen >= count:
            done.set()

    await queue.consume(on_message)
    await done.wait()
    print(window.report(seen))
    await connection.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
