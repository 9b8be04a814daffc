"""The demo while it runs: publishing the plan, polling every replica's counters, the progress
line, and waiting for the last results and the cluster counters once every delivery is handled."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TextIO

import aio_pika
import aiohttp

from worker.cli import publish
from worker.cli.demo_setup import DemoFailed, DemoOptions
from worker.cli.replicas import ReplicaGroup, ReplicaNames
from worker.cli.samples import SamplePlan
from worker.core.redaction import redact_url
from worker.observability.metrics import CounterName
from worker.observability.stats import read_counters
from worker.redisio.clients import make_client
from worker.redisio.keys import RedisKeys
from worker.redisio.link import REDIS_ERRORS

POLL_INTERVAL_S = 0.25  # each poll asks every replica for its stats: keep it light
PROGRESS_INTERVAL_S = 0.5
QUIET_PROGRESS_INTERVAL_S = 2.0  # when stderr is not a terminal, a new line every 2 s
SETTLE_S = 5.0
ACCOUNTED = (
    CounterName.PROCESSED,
    CounterName.DUPLICATES,
    CounterName.REDELIVERED_DONE,
    CounterName.DEAD_LETTERED,
)
COMPARED = (
    CounterName.PROCESSED,
    CounterName.DUPLICATES,
    CounterName.CACHE_HITS,
    CounterName.CACHE_MISSES,
    CounterName.CLASSIFIER_CALLS,
)


@dataclass(slots=True)
class ResultCounter:
    """Counts the results the replicas publish, by message ID."""

    by_id: Counter[str] = field(default_factory=Counter)
    total: int = 0
    last_at: float = 0.0

    async def on_result(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        self.by_id[message.message_id or ""] += 1
        self.total += 1
        self.last_at = time.monotonic()


@dataclass(slots=True)
class Progress:
    """What the replicas reported at the last poll."""

    published: int = 0
    per_replica: dict[str, dict[str, int]] = field(default_factory=dict)
    in_flight: int = 0

    def total(self, counter: CounterName) -> int:
        return sum(c.get(counter, 0) for c in self.per_replica.values())

    @property
    def accounted(self) -> int:
        return sum(self.total(c) for c in ACCOUNTED)

    def published_at_least(self, total: int) -> int:
        """Deliveries known to be published: confirmed by the broker, or already received by a
        replica (confirms of a chunk come after its first messages are processed), at most ``total``."""
        return min(total, max(self.published, self.accounted + self.in_flight))


@dataclass(slots=True)
class Watcher:
    """Publishes a run's plan and follows the replicas until every delivery is accounted for."""

    rabbitmq_url: str
    names: ReplicaNames
    options: DemoOptions
    replicas: ReplicaGroup
    stop: asyncio.Event
    err: TextIO
    progress: Progress = field(default_factory=Progress)
    input_arguments: Mapping[str, str | int] = field(default_factory=dict)  # if it creates it
    line_open: bool = False  # a progress line is on the terminal without its newline

    async def publish_plan(self, plan: SamplePlan) -> None:
        messages = publish.from_bodies(m.to_body() for m in plan.messages)
        rate = self.options.rate_per_s
        # Chunks, so progress can show what is published; about half a second each when paced.
        size = max(1, int(rate / 2)) if rate > 0 else 200
        for start in range(0, len(messages), size):
            if self.stop.is_set():
                return
            chunk = messages[start : start + size]
            await publish.publish(
                self.rabbitmq_url,
                self.names.input_queue,
                chunk,
                rate_per_s=rate,
                arguments=self.input_arguments,
            )
            self.progress.published += len(chunk)

    async def poll(self, session: aiohttp.ClientSession) -> None:
        """Read every replica's own counters from its stats endpoint."""
        in_flight = 0
        for replica in self.replicas:
            if replica.exited and not self.stop.is_set():  # Ctrl-C reaches the replicas too
                raise DemoFailed(f"replica {replica.name} exited:\n{replica.log_tail()}")
            url = f"http://127.0.0.1:{replica.stats_port}/api/monitoring/stats"
            try:
                async with session.get(url) as response:
                    own = (await response.json())["replica"]
            except (aiohttp.ClientError, TimeoutError, ValueError, KeyError):
                continue  # keep the previous numbers for this tick
            self.progress.per_replica[replica.name] = own["counters"]
            in_flight += int(own["in_flight"])
        self.progress.in_flight = in_flight

    def show_progress(self, started: float, total: int, final: bool = False) -> None:
        p = self.progress
        line = (
            f"  {time.monotonic() - started:5.1f}s"
            f"  published {p.published_at_least(total):,}/{total:,}"
            f"  processed {p.total(CounterName.PROCESSED):,}"
            f"  duplicates skipped {p.total(CounterName.DUPLICATES):,}"
            f"  cache hits {p.total(CounterName.CACHE_HITS):,}  in flight {p.in_flight}"
        )
        if self.err.isatty():
            self.err.write("\r\x1b[K" + line + ("\n" if final else ""))
            self.line_open = not final
        else:
            self.err.write(line + "\n")
        self.err.flush()

    def end_line(self) -> None:
        """End the progress line on the terminal, so what is written next starts a line."""
        if self.line_open:
            self.err.write("\n")
            self.err.flush()
            self.line_open = False

    async def watch(self, plan: SamplePlan, started: float) -> bool:
        """Poll until every delivery is accounted for; ``False`` if stopped or timed out."""
        publishing = asyncio.get_running_loop().create_task(self.publish_plan(plan))
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
                return await self._until_accounted(session, publishing, started, len(plan.messages))
        finally:
            # Interrupted: let the chunk in progress finish (cancelling it mid-way leaves its
            # publishes dangling), unless the broker stopped answering.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(publishing, timeout=10)

    async def _until_accounted(
        self,
        session: aiohttp.ClientSession,
        publishing: asyncio.Task[None],
        started: float,
        total: int,
    ) -> bool:
        interval_s = PROGRESS_INTERVAL_S if self.err.isatty() else QUIET_PROGRESS_INTERVAL_S
        shown = 0.0
        deadline: float | None = None
        while not self.stop.is_set():
            await self.poll(session)
            if publishing.done():
                self._check_published(publishing)
                deadline = deadline or time.monotonic() + self.options.timeout_s
            done = publishing.done() and self.progress.accounted >= total
            if done or time.monotonic() - shown >= interval_s:
                shown = time.monotonic()
                self.show_progress(started, total, final=done)
            if done:
                return True
            if deadline is not None and time.monotonic() > deadline:
                raise DemoFailed(
                    f"not every message was handled within {self.options.timeout_s:.0f}s"
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), POLL_INTERVAL_S)
        return False

    def _check_published(self, publishing: asyncio.Task[None]) -> None:
        failure = publishing.exception()
        if failure is not None:
            where = redact_url(self.rabbitmq_url)
            raise DemoFailed(f"publishing to {where} failed ({type(failure).__name__})")

    async def settle(
        self, results: ResultCounter, redis_url: str, redis_timeout_s: float
    ) -> dict[str, int] | None:
        """Wait for the last results and, with Redis, for the cluster counters to catch up."""
        deadline = time.monotonic() + SETTLE_S
        while results.total < self.progress.total(CounterName.PROCESSED):
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        if not redis_url:
            return None
        client = await make_client(redis_url, "auto", redis_timeout_s)
        keys = RedisKeys(self.names.key_prefix)
        try:
            cluster = await read_counters(client, keys)
            while any(cluster[c] != self.progress.total(c) for c in COMPARED):
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
                cluster = await read_counters(client, keys)
            return cluster
        except REDIS_ERRORS:
            return None
        finally:
            await client.aclose()
