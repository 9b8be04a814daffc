"""Retries go through delay queues with growing delays and end in the dead-letter queue after
exactly MAX_ATTEMPTS attempts, also for a message that kills every replica that takes it."""

from __future__ import annotations

import asyncio
import itertools
import signal
import time
from datetime import datetime
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests.conftest import Names
from tests.integration.support import (
    Replicas,
    ResultSink,
    body,
    drain_queue,
    publish_bodies,
    wait_counter,
)
from worker.amqp.broker import ATTEMPT_HEADER, DETAIL_HEADER, REASON_HEADER
from worker.observability.metrics import CounterName

pytestmark = pytest.mark.integration

MAX_ATTEMPTS = 5
BASE_DELAY_S = 0.2  # the names fixture's RETRY_BASE_DELAY_S: delays 0.2, 0.4, 0.8, 1.6 s


def event_times(events: list[dict[str, object]], name: str, message_id: str) -> list[float]:
    return [
        datetime.fromisoformat(str(e["timestamp"]).replace("Z", "+00:00")).timestamp()
        for e in events
        if e.get("event") == name and e.get("message_id") == message_id
    ]


async def test_always_failing_message_is_dead_lettered_after_exactly_max_attempts(
    names: Names, redis_client: aioredis.Redis, amqp: object, tmp_path: Path
) -> None:
    """A message whose classification always fails is tried exactly MAX_ATTEMPTS times, each
    after a delay at least as long as configured (doubling each time), then dead-lettered with
    the last error and the count; the 300 messages queued behind it (one delivery in flight at a
    time) are all done well before it is given up."""
    replicas = Replicas(tmp_path)
    try:
        async with ResultSink(names) as sink:
            replica = replicas.start(
                names.env(
                    FAULT_INJECTION="fail_classify:fail-",
                    MAX_ATTEMPTS=str(MAX_ATTEMPTS),
                    PREFETCH="1",
                )
            )
            await replica.started()
            behind = [body(f"ok-{i}", f"Спасибо за заказ {i}") for i in range(300)]
            await publish_bodies(names, [body("fail-1", "Этот всегда падает"), *behind])
            await sink.wait_for_ids({m["message_id"] for m in behind}, timeout_s=30)
            all_done_at = time.time()
            (letter,) = await drain_queue(names, names.dead_letter_queue, 20, expected=1)

            headers = letter.headers or {}
            assert headers[REASON_HEADER] == "retries_exhausted"
            assert headers[ATTEMPT_HEADER] == MAX_ATTEMPTS
            assert "injected classification failure" in str(headers[DETAIL_HEADER])
            assert "fail-1" not in sink.by_id
            counters = await wait_counter(redis_client, names, CounterName.DEAD_LETTERED, 1)
            assert counters[CounterName.FAILED] == MAX_ATTEMPTS
            assert counters[CounterName.RETRIED] == MAX_ATTEMPTS - 1
            assert counters[CounterName.PROCESSED] == 300

            events = replica.events()
            retries = event_times(events, "message_retry_scheduled", "fail-1")
            (dead_at,) = event_times(events, "message_dead_lettered", "fail-1")
            ends = [*retries, dead_at]  # the end of each attempt
            assert len(ends) == MAX_ATTEMPTS
            gaps = [later - earlier for earlier, later in itertools.pairwise(ends)]
            for attempt, gap in enumerate(gaps, start=1):
                assert gap >= BASE_DELAY_S * 2 ** (attempt - 1) * 0.9, gaps
            # The first retry also queued behind the 300; once they were done, each wait was
            # longer than the one before.
            assert gaps[1:] == sorted(gaps[1:]), gaps
            assert all_done_at < dead_at - 1.0
            assert replica.process is not None
            assert replica.process.poll() is None
    finally:
        replicas.close()


async def test_message_that_kills_its_replica_is_dead_lettered_after_max_attempts(
    names: Names, redis_client: aioredis.Redis, amqp: object, tmp_path: Path
) -> None:
    """A message that SIGKILLs every replica that claims it kills exactly MAX_ATTEMPTS of them;
    the next replica dead-letters it (counted attempts: MAX_ATTEMPTS) instead of dying, and the
    twenty messages that were in flight with it are processed, none dead-lettered."""
    max_attempts = 3
    env = names.env(
        FAULT_INJECTION="kill_after_claim:poison-",
        MAX_ATTEMPTS=str(max_attempts),
        CLAIM_LEASE_S="1",
    )
    others = [body(f"other-{i}", f"Здравствуйте {i}") for i in range(20)]
    replicas = Replicas(tmp_path)
    try:
        async with ResultSink(names) as sink:
            await publish_bodies(names, [body("poison-1", "Убийственное сообщение"), *others])
            kills = 0
            survivor = None
            for _ in range(max_attempts + 2):
                replica = replicas.start(env)
                for _ in range(300):  # at most 30 s: dies, or dead-letters the poison
                    if replica.process is not None and replica.process.poll() is not None:
                        break
                    if "retries_exhausted" in replica.log_text():
                        break
                    await asyncio.sleep(0.1)
                if replica.process is not None and replica.process.poll() == -signal.SIGKILL:
                    kills += 1
                    continue
                survivor = replica
                break
            assert kills == max_attempts
            assert survivor is not None

            (letter,) = await drain_queue(names, names.dead_letter_queue, 20, expected=1)
            headers = letter.headers or {}
            assert headers[REASON_HEADER] == "retries_exhausted"
            assert headers[ATTEMPT_HEADER] == max_attempts
            assert "stopped" in str(headers[DETAIL_HEADER])
            assert int(await redis_client.get(names.keys.attempts("poison-1"))) == (max_attempts)
            await sink.wait_for_ids({m["message_id"] for m in others}, timeout_s=30)
            assert "poison-1" not in sink.by_id
            # The messages in flight with it when it first struck were not dead-lettered.
            assert await drain_queue(names, names.dead_letter_queue, timeout_s=1) == []
            assert survivor.process is not None
            assert survivor.process.poll() is None
    finally:
        replicas.close()
