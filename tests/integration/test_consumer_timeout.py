"""A broker whose consumer_timeout is shorter than a message's work: the closure is said and
counted, and every message still ends processed once.

The shared broker's ``consumer_timeout`` is global configuration (RabbitMQ 3.10 has no per-queue
form), so the test runs a node of its own (``tests.integration.rabbit_nodes``) with a 3 s timeout,
checked every 0.5 s (``channel_tick_interval``, 60 s by default, is how often a channel looks).
"""

from __future__ import annotations

import time
from pathlib import Path

import aio_pika
import pytest
import redis.asyncio as aioredis

from tests.conftest import Names
from tests.integration.rabbit_nodes import spare_node
from tests.integration.support import (
    Replicas,
    ResultSink,
    body,
    cluster_counters,
    wait_counter,
)
from worker.cli import publish
from worker.cli.replicas import listen_for_results
from worker.core.settings import load_settings
from worker.observability.metrics import CounterName

pytestmark = pytest.mark.integration

BROKER_TIMEOUT_MS = 3_000
WORK_MS = 5_000
MESSAGES = 20


class NodeSink(ResultSink):
    """The results of this test's replica, on the node of its own."""

    def __init__(self, names: Names, url: str) -> None:
        super().__init__(names)
        self.url = url

    async def __aenter__(self) -> NodeSink:
        self._connection = await aio_pika.connect_robust(self.url)
        await listen_for_results(self._connection, self._names.results_exchange, self._on_result)
        return self


async def test_a_consumer_timeout_is_one_warning_and_a_count_and_loses_nothing(
    names: Names, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    """Each message takes 5 s to classify on a broker that closes a channel holding a delivery
    for 3 s: each closure is one warning naming the broker's timeout and the fix, counted as
    ``consumer_timeouts``; the redelivered copies are recognised as done, so every message has
    exactly one result and none is dead-lettered."""
    directory = tmp_path / "rabbit"
    directory.mkdir()
    (directory / "advanced.config").write_text("[{rabbit, [{channel_tick_interval, 500}]}].\n")
    with spare_node(directory, extra_config=[f"consumer_timeout = {BROKER_TIMEOUT_MS}"]) as node:
        replicas = Replicas(tmp_path)
        try:
            async with NodeSink(names, node.url) as sink:
                env = names.env(
                    RABBITMQ_URL=node.url,
                    CLASSIFIER_DELAY_MS=str(WORK_MS),
                    PREFETCH=str(MESSAGES),
                    WORK_TIMEOUT_S="30",
                )
                bodies = [body(f"t-{i}", f"Где мой заказ номер {i}?") for i in range(MESSAGES)]
                arguments = names.topology(load_settings()).input_arguments()
                # All waiting before the replica consumes: its two passes take them at once.
                await publish.publish(
                    node.url, names.input_queue, publish.from_bodies(bodies), arguments=arguments
                )
                started = time.monotonic()
                replica = await replicas.start(env).started(timeout_s=60)
                await sink.wait_for_ids({b["message_id"] for b in bodies}, timeout_s=90)
                counters = await wait_counter(
                    redis_client, names, CounterName.REDELIVERED_DONE, MESSAGES, timeout_s=60
                )
                took_s = time.monotonic() - started
                await sink.settle(quiet_s=2.0)
                counters = await cluster_counters(redis_client, names)

                warnings = [e for e in replica.events() if e["event"] == "broker_consumer_timeout"]
                print(
                    f"consumer_timeout {BROKER_TIMEOUT_MS} ms, work {WORK_MS} ms, {MESSAGES} "
                    f"messages: {len(warnings)} closure(s) warned, "
                    f"consumer_timeouts={counters[CounterName.CONSUMER_TIMEOUTS]}, "
                    f"results={sink.total}, processed={counters[CounterName.PROCESSED]}, "
                    f"redelivered_done={counters[CounterName.REDELIVERED_DONE]}, "
                    f"dead_lettered={counters[CounterName.DEAD_LETTERED]}, all done in {took_s:.1f} s"
                )
                # One warning per closure, each counted. Usually two or three closures: the slow
                # classifier takes one call at a time, so a pass's copies wait behind the one in
                # work (the inbox wait the start-up check now counts) and time out again.
                assert 1 <= len(warnings) == counters[CounterName.CONSUMER_TIMEOUTS]
                assert warnings[0]["broker_timeout_s"] == BROKER_TIMEOUT_MS / 1000
                assert "consumer_timeout" in warnings[0]["fix"]
                assert sink.total == MESSAGES
                assert all(len(results) == 1 for results in sink.by_id.values())
                assert counters[CounterName.PROCESSED] == MESSAGES
                assert counters[CounterName.DEAD_LETTERED] == 0
        finally:
            replicas.close()
