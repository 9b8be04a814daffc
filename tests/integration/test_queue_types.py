"""Quorum queues: an operator's own is used as it is, QUEUE_TYPE creates them, and what the broker
drops (a delivery limit) reaches the dead-letter queue instead of vanishing."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pytest
import redis.asyncio as aioredis

from tests.conftest import RABBITMQ_URL, Names
from tests.integration.servers import free_port
from tests.integration.support import (
    Replicas,
    ResultSink,
    body,
    drain_queue,
    publish_bodies,
    rabbitmqctl_usable,
    run_cli,
    wait_counter,
)
from worker.amqp.topology import ATTEMPT_HEADER, DETAIL_HEADER, REASON_HEADER
from worker.core.settings import load_settings
from worker.observability.metrics import CounterName

pytestmark = pytest.mark.integration


async def declare(name: str, arguments: dict[str, Any]) -> None:
    """Declare a queue as an operator would, before any replica runs."""
    connection = await aio_pika.connect(RABBITMQ_URL)
    try:
        channel = await connection.channel()
        await channel.declare_queue(name, durable=True, arguments=arguments)
    finally:
        await connection.close()


def queue_types(names: Names) -> dict[str, str]:
    """The broker's own word (rabbitmqctl) on the type of each queue of this test."""
    listed = subprocess.run(
        ["rabbitmqctl", "list_queues", "name", "type", "-q", "--no-table-headers"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    rows = (line.split("\t") for line in listed.splitlines())
    return {row[0]: row[1].strip() for row in rows if len(row) == 2 and names.tag in row[0]}


@pytest.mark.parametrize("delivery_limit", [None, 50], ids=["no-limit", "limit-50"])
async def test_a_predeclared_quorum_input_queue_is_used_as_it_is(
    names: Names,
    redis_client: aioredis.Redis,
    amqp: object,
    tmp_path: Path,
    delivery_limit: int | None,
) -> None:
    """An input queue the operator declared as a quorum queue (with or without a delivery limit):
    `publish` sends 2,000 messages into it and a replica processes each exactly once, saying it
    found a quorum queue."""
    arguments: dict[str, Any] = {"x-queue-type": "quorum"}
    if delivery_limit is not None:
        arguments["x-delivery-limit"] = delivery_limit
    await declare(names.input_queue, arguments)
    bodies = [body(f"q-{i}", f"Где мой заказ номер {i}? Order #{i}") for i in range(2000)]
    jsonl = tmp_path / "messages.jsonl"
    jsonl.write_bytes(b"\n".join(orjson.dumps(b) for b in bodies) + b"\n")
    replicas = Replicas(tmp_path)
    try:
        async with ResultSink(names) as sink:
            replica = await replicas.start(names.env(PREFETCH="200")).started()
            code, lines = run_cli(names.env(), "publish", str(jsonl))
            assert code == 0, lines
            await sink.wait_for_ids({b["message_id"] for b in bodies}, timeout_s=120)
            counters = await wait_counter(redis_client, names, CounterName.PROCESSED, 2000)
            await sink.settle(quiet_s=1.0)

            assert sink.total == 2000
            assert all(len(results) == 1 for results in sink.by_id.values())
            assert counters[CounterName.PROCESSED] == 2000
            ready = replica.event("topology_ready")
            assert ready is not None
            assert ready["input_queue"] == "quorum, existing"
    finally:
        replicas.close()


@pytest.mark.skipif(not rabbitmqctl_usable(), reason="needs rabbitmqctl for the local broker")
@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
async def test_queue_type_creates_its_queues_and_retries_and_dead_letters_work_on_it(
    names: Names, redis_client: aioredis.Redis, amqp: object, tmp_path: Path, queue_type: str
) -> None:
    """With QUEUE_TYPE on fresh names, every queue the replica creates is of that type; a message
    that always fails is retried and dead-lettered after MAX_ATTEMPTS with its reason, while the
    others are processed."""
    replicas = Replicas(tmp_path)
    env = names.env(QUEUE_TYPE=queue_type, MAX_ATTEMPTS="3", FAULT_INJECTION="fail_classify:fail-")
    try:
        async with ResultSink(names) as sink:
            replica = await replicas.start(env).started()
            good = [body(f"ok-{i}", f"Спасибо за заказ {i}") for i in range(50)]
            await publish_bodies(names, [body("fail-1", "Этот всегда падает"), *good])
            await sink.wait_for_ids({m["message_id"] for m in good}, timeout_s=30)
            (letter,) = await drain_queue(names, names.dead_letter_queue, 30, expected=1)
            await wait_counter(redis_client, names, CounterName.DEAD_LETTERED, 1)

            headers = letter.headers or {}
            assert headers[REASON_HEADER] == "retries_exhausted"
            assert headers[ATTEMPT_HEADER] == 3
            assert "injected classification failure" in str(headers[DETAIL_HEADER])
            created = queue_types(names)
            expected = {
                names.input_queue,
                names.dead_letter_queue,
                f"{names.input_queue}.retry.200ms",
                f"{names.input_queue}.retry.400ms",
                f"{names.results_exchange}.unrouted",
            }
            assert created == dict.fromkeys(expected, queue_type)
            ready = replica.event("topology_ready")
            assert ready is not None
            assert ready["input_queue"] == f"{queue_type}, created"
    finally:
        replicas.close()


async def test_a_delivery_limit_sends_what_the_broker_drops_to_the_dead_letter_queue(
    names: Names, redis_client: aioredis.Redis, amqp: object, tmp_path: Path
) -> None:
    """The worker's own quorum input queue with a delivery limit of 2 (what RabbitMQ 4 gives every
    quorum queue, at 20): replicas whose claims cannot be made (strict mode, Redis unreachable)
    hand their deliveries back three times; the broker dead-letters those past the limit, with
    its x-death reason, and a healthy replica processes the rest. None of the 100 is dropped."""
    topology = names.topology(load_settings(queue_type="quorum"))
    await declare(names.input_queue, {**topology.input_arguments(), "x-delivery-limit": 2})
    await declare(names.dead_letter_queue, topology.plain_arguments())
    bodies = [body(f"d-{i}", f"Где мой заказ номер {i}?") for i in range(100)]
    await publish_bodies(names, bodies)
    failing = names.env(
        REDIS_URL=f"redis://127.0.0.1:{free_port()}/0", REDIS_FAILURE_MODE="strict", PREFETCH="60"
    )
    replicas = Replicas(tmp_path)
    try:
        for _ in range(3):
            replica = replicas.start(failing)
            await replica.wait_for_log("consumer_paused", timeout_s=30)
            assert await replica.stop(30) == 0
        code, lines = run_cli(names.env(), "dead-letters", "--json", "--show", "1")
        assert code == 0, lines
        listed = orjson.loads("\n".join(lines))
        assert list(listed["by_reason"]) == ["broker:delivery_limit"]
        assert f"from {names.input_queue}" in listed["messages"][0]["detail"]
        async with ResultSink(names) as sink:
            await replicas.start(names.env()).started()
            dead = await drain_queue(names, names.dead_letter_queue, 30, expected=1)
            processed = 100 - len(dead)
            await wait_counter(redis_client, names, CounterName.PROCESSED, processed)
            await sink.settle(quiet_s=1.0)

            reasons = {(m.headers or {})["x-death"][0]["reason"] for m in dead}
            dead_ids = {orjson.loads(m.body)["message_id"] for m in dead}
            print(
                f"delivery limit 2: {len(dead)} dead-lettered by the broker, {sink.total} processed"
            )
            assert 0 < len(dead) < 100
            assert reasons == {"delivery_limit"}
            assert sink.total == processed
            assert not dead_ids & sink.by_id.keys()
            assert dead_ids | sink.by_id.keys() == {b["message_id"] for b in bodies}
    finally:
        replicas.close()


async def test_in_memory_mode_the_quorum_delivery_count_bounds_a_message_that_kills_replicas(
    names: Names, amqp: object, tmp_path: Path
) -> None:
    """Without Redis, attempts counted in memory die with each replica a poison message kills;
    a quorum queue's x-delivery-count still counts them, so after MAX_ATTEMPTS crashes the next
    replica dead-letters the message instead of dying too."""
    env = names.env(
        redis=False,
        QUEUE_TYPE="quorum",
        MAX_ATTEMPTS="2",
        FAULT_INJECTION="kill_after_claim:poison-",
    )
    replicas = Replicas(tmp_path)
    try:
        replica = await replicas.start(env).started()
        await publish_bodies(names, [body("poison-1", "Этот убивает реплику")])
        for _ in range(2):  # attempts 1 and 2: each kills its replica
            assert await replica.wait_exit(30) == -9
            replica = await replicas.start(env).started()
        (letter,) = await drain_queue(names, names.dead_letter_queue, 30, expected=1)
        headers = letter.headers or {}
        assert headers[REASON_HEADER] == "retries_exhausted"
        assert headers[ATTEMPT_HEADER] == 2
        assert not replica.exited
    finally:
        replicas.close()
