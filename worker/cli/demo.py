"""``neiromatrius-worker demo``: replicas, generated traffic, live progress and a final table.

The demo starts ``--replicas`` processes of ``neiromatrius-worker run`` against the configured
RabbitMQ (and Redis, when ``REDIS_URL`` or ``--redis-url`` is given), publishes sample traffic with
a known number of duplicate deliveries and repeated texts, shows progress while the replicas work,
and ends with what deduplication and the cache did, checked against what it published.

Everything it creates belongs to one run: queues, exchange and Redis keys are named after a random
run tag (``neiromatrius.demo.{tag}.*``, ``neiromatrius:demo:{tag}:``), so a real deployment on the
same broker and Redis is never disturbed, and all of it is removed at the end (TTLs are short in
case the demo is killed before it can clean up).

Without Redis every replica deduplicates and caches on its own: a duplicate that reaches a replica
which has not seen its ID is processed again, and the table says how often that happened.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

from worker.cli.demo_progress import ResultCounter, Watcher
from worker.cli.demo_report import RunFacts, report, summary
from worker.cli.demo_setup import (
    DemoFailed,
    DemoOptions,
    demo_names,
    preflight,
    remove_broker_objects,
    remove_redis_keys,
)
from worker.cli.replicas import (
    ReplicaError,
    ReplicaGroup,
    ReplicaProcess,
    listen_for_results,
    replica_env,
)
from worker.cli.samples import SamplePlan, generate_sample
from worker.core.settings import Settings

__all__ = ["DemoFailed", "DemoOptions", "run_demo"]

START_TIMEOUT_S = 30.0
START_POLL_S = 0.1
DEMO_TTL_S = 3600  # done markers and cache entries of a demo expire within the hour


class Demo:
    """One run: set up, start replicas, publish, watch, report, clean up."""

    def __init__(
        self, settings: Settings, options: DemoOptions, stop: asyncio.Event, err: TextIO
    ) -> None:
        self.settings = settings
        self.options = options
        self.stop = stop
        self.err = err
        self.names = demo_names()
        self.results = ResultCounter()
        # Removed at the end of run(), or when the process exits if it never gets that far.
        self.log_dir = tempfile.TemporaryDirectory(prefix="neiromatrius-demo-")
        self.replicas = ReplicaGroup(Path(self.log_dir.name))
        self.watcher = Watcher(settings.rabbitmq_url, self.names, options, self.replicas, stop, err)
        self.watcher.input_arguments = self.names.topology(settings).input_arguments()

    def child_env(self, replica_id: str) -> dict[str, str]:
        # The children get this process's environment (so .env and every other setting apply to
        # them as to us), with the demo's own names and a port chosen by the system.
        return replica_env(
            os.environ,
            self.names,
            REDIS_URL=self.options.redis_url,
            RABBITMQ_URL=self.settings.rabbitmq_url,
            DEDUP_TTL_S=str(DEMO_TTL_S),
            CACHE_TTL_S=str(DEMO_TTL_S),
            LOG_LEVEL="info",
            HEARTBEAT_INTERVAL_S="0.5",
            REPLICA_ID=replica_id,
            FAULT_INJECTION="",
        )

    async def start_replicas(self) -> None:
        for n in range(1, self.options.replicas + 1):
            replica_id = f"demo-{self.names.tag}-{n}"
            self.replicas.start(self.child_env(replica_id), replica_id)
        await asyncio.gather(*(self._started(r) for r in self.replicas))

    async def _started(self, replica: ReplicaProcess) -> None:
        try:
            await replica.started(START_TIMEOUT_S, poll_s=START_POLL_S)
        except ReplicaError:
            if replica.exited:
                raise DemoFailed(f"replica {replica.name} exited:\n{replica.log_tail()}") from None
            raise DemoFailed(
                f"replica {replica.name} did not start in {START_TIMEOUT_S:.0f}s"
            ) from None

    async def cleanup(self) -> None:
        """Remove the run's queues, exchange and Redis keys (each step on its own: best effort)."""
        await remove_broker_objects(self.settings, self.names)
        if self.options.redis_url:
            await remove_redis_keys(self.settings, self.options.redis_url, self.names, self.err)

    async def stop_replicas(self) -> list[int | None]:
        return await self.replicas.stop(self.settings.drain_timeout_s + 10)

    async def observe(self, plan: SamplePlan) -> tuple[dict[str, int] | None, float] | None:
        """Publish and watch until every delivery is handled; the cluster counters and the
        seconds from the start to the last result, or ``None`` if interrupted."""
        started = time.monotonic()
        if not await self.watcher.watch(plan, started):
            return None
        cluster = await self.watcher.settle(
            self.results, self.options.redis_url, self.settings.redis_timeout_s
        )
        return cluster, max(self.results.last_at - started, 1e-3)

    async def run(self) -> dict[str, Any] | None:
        """The whole run; the summary, or ``None`` if interrupted."""
        o = self.options
        plan = generate_sample(o.messages, o.duplicates, o.repeat_texts, seed=o.seed)
        connection = await preflight(self.settings, o.redis_url)
        observed = None
        try:
            try:
                await listen_for_results(
                    connection, self.names.results_exchange, self.results.on_result
                )
                self.err.write(f"demo: starting {o.replicas} replicas (run {self.names.tag})\n")
                await self.start_replicas()
                observed = await self.observe(plan)
            finally:
                codes = await self.stop_replicas()
                self.log_dir.cleanup()
        finally:
            await connection.close()
            await self.cleanup()
        if observed is None:
            return None
        cluster, elapsed_s = observed
        progress = self.watcher.progress
        facts = RunFacts(o, self.names, plan, progress, self.results, cluster, elapsed_s, codes)
        return summary(facts)


def no_redis_notice(options: DemoOptions) -> str:
    """The line that says the demo runs without Redis; the way to add it unless --no-redis said
    that is what the user wants."""
    why = "--no-redis" if options.no_redis else "set REDIS_URL or pass --redis-url"
    return (
        f"demo: no Redis ({why}): in-memory replicas, so "
        "duplicates across replicas are possible and the numbers will show it\n"
    )


async def run_demo(settings: Settings, options: DemoOptions, stop: asyncio.Event) -> int:
    """Run the demo and print its report; the exit code."""
    err = sys.stderr
    if not options.redis_url:
        err.write(no_redis_notice(options))
    demo = Demo(settings, options, stop, err)
    try:
        found = await demo.run()
    except DemoFailed as exc:
        demo.watcher.end_line()
        err.write(f"demo: {exc}\n")
        return 1
    if found is None:
        demo.watcher.end_line()
        err.write("demo: interrupted; replicas stopped and the run's queues and keys removed\n")
        return 130
    return report(found, options.as_json, err)
