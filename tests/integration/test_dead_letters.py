"""``neiromatrius-worker dead-letters``: listing takes nothing off the dead-letter queue, and a
replay moves exactly the selected dead letters back, each processed once, even when the command
is SIGKILLed between a confirmed copy and its acknowledgement."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import orjson
import pytest
import redis.asyncio as aioredis

from tests.conftest import RABBITMQ_URL, Names
from tests.integration.support import (
    Replicas,
    ResultSink,
    body,
    publish_bodies,
    publish_raw,
    wait_counter,
)
from worker.observability.metrics import CounterName

pytestmark = pytest.mark.integration

EXHAUSTED = 40
INVALID = {"not_json": 20, "no_text": 20, "empty_text": 20}


def dead_letters(names: Names, *args: str, **env: str) -> tuple[int, str, str]:
    """The command in a process of its own: exit code, stdout, stderr."""
    done = subprocess.run(
        [sys.executable, "-m", "worker", "dead-letters", *args],
        env=names.env(**env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done.returncode, done.stdout, done.stderr


def listing(names: Names, *args: str) -> dict[str, Any]:
    code, out, err = dead_letters(names, "--json", *args)
    assert code == 0, err
    result: dict[str, Any] = orjson.loads(out)
    return result


async def queue_depth(queue: str) -> int:
    connection = await aio_pika.connect(RABBITMQ_URL)
    try:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return declared.declaration_result.message_count or 0
    finally:
        await connection.close()


async def wait_depth(queue: str, expected: int, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (depth := await queue_depth(queue)) != expected and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert depth == expected


async def make_dead_letters(names: Names, replicas: Replicas) -> None:
    """100 dead letters: 40 whose classification failed with MAX_ATTEMPTS=1, 60 invalid bodies."""
    faulty = replicas.start(
        names.env(FAULT_INJECTION="fail_classify:fail-", MAX_ATTEMPTS="1"), name="faulty"
    )
    await faulty.started()
    await publish_bodies(
        names, [body(f"fail-{i}", f"Заказ {i} не пришёл") for i in range(EXHAUSTED)]
    )
    raw: list[tuple[bytes, str | None]] = []
    for i in range(INVALID["not_json"]):
        raw.append((f"not json {i}".encode(), f"nj-{i}"))
    for i in range(INVALID["no_text"]):
        raw.append((orjson.dumps({"message_id": f"nt-{i}"}), f"nt-{i}"))
    for i in range(INVALID["empty_text"]):
        raw.append((orjson.dumps({"message_id": f"et-{i}", "text": " "}), f"et-{i}"))
    await publish_raw(names, raw)
    await wait_depth(names.dead_letter_queue, EXHAUSTED + sum(INVALID.values()))
    await faulty.stop(10)


def ids_shown(summary: dict[str, Any]) -> list[str]:
    return [m["message_id"] for m in summary["messages"]]


async def test_replay_after_a_sigkill_processes_every_selected_dead_letter_once(
    names: Names, redis_client: aioredis.Redis, amqp: object, tmp_path: Path
) -> None:
    """Listing 100 dead letters counts them by reason, shows no text unless asked and leaves them
    in order; ``--replay --reason retries_exhausted`` SIGKILLed after a confirmed copy, then run
    again, processes each of those 40 exactly once (the copy sent twice counted as a duplicate)
    and leaves the 60 others untouched and in order."""
    replicas = Replicas(tmp_path)
    try:
        async with ResultSink(names) as sink:
            await make_dead_letters(names, replicas)
            first = listing(names, "--show", "100")
            assert first["count"] == 100
            assert first["by_reason"] == {"retries_exhausted": EXHAUSTED, **INVALID}
            assert first["oldest"] == first["newest"] == "unknown"  # nothing sets a timestamp
            assert all("text" not in m for m in first["messages"])
            again = listing(names, "--show", "100", "--text")
            assert ids_shown(again) == ids_shown(first)
            assert again["messages"][0]["text"] == "Заказ 0 не пришёл"

            healthy = replicas.start(names.env(MAX_ATTEMPTS="1"), name="healthy")
            await healthy.started()
            await _replay_killed_after(names, published=3)
            await wait_depth(names.dead_letter_queue, 100 - 2)  # the third was never acked

            second = listing(names, "--replay", "--reason", "retries_exhausted")
            assert (second["replayed"], second["left"]) == (EXHAUSTED - 2, 60)
            selected = {f"fail-{i}" for i in range(EXHAUSTED)}
            await sink.wait_for_ids(selected, timeout_s=15)
            counters = await wait_counter(redis_client, names, CounterName.DUPLICATES, 1)
            await sink.settle(1.0)
            assert {i: len(sink.by_id[i]) for i in selected} == dict.fromkeys(selected, 1)
            assert sink.by_id.keys() == selected
            assert counters[CounterName.DUPLICATES] == 1

            rest = listing(names, "--show", "100")
            assert rest["by_reason"] == INVALID
            assert ids_shown(rest) == [i for i in ids_shown(first) if not i.startswith("fail-")]
    finally:
        replicas.close()


async def _replay_killed_after(names: Names, published: int) -> None:
    """Starts a paced replay and SIGKILLs it while its copy number ``published`` awaits its ack."""
    command = [sys.executable, "-m", "worker", "dead-letters", "--replay"]
    process = await asyncio.create_subprocess_exec(
        *command,
        "--reason",
        "retries_exhausted",
        "--pace-s",
        "0.5",
        env=names.env(),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    try:
        lines = []
        while len(lines) < published:
            line = await asyncio.wait_for(process.stderr.readline(), 30)
            assert line, f"the replay ended early: {lines}"
            lines.append(line)
        process.kill()
        await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_errors_are_one_line_with_exit_2_for_configuration(names: Names) -> None:
    """A missing dead-letter queue and a refused login each print one line naming the setting
    and exit 2; an unreachable broker exits 1; never a traceback."""
    code, out, err = dead_letters(names, DEAD_LETTER_QUEUE=f"{names.dead_letter_queue}.none")
    assert (code, out) == (2, "")
    assert err.count("\n") == 1
    assert "DEAD_LETTER_QUEUE" in err
    parts = urlsplit(RABBITMQ_URL)
    bad_login = parts._replace(
        netloc=f"{parts.username}:wrong@{parts.hostname}:{parts.port or 5672}"
    ).geturl()
    code, _, err = dead_letters(names, RABBITMQ_URL=bad_login)
    assert code == 2
    assert err.count("\n") == 1
    assert "RABBITMQ_URL" in err
    assert "wrong" not in err
    code, _, err = dead_letters(names, RABBITMQ_URL="amqp://guest:guest@127.0.0.1:1/")
    assert code == 1
    assert err.count("\n") == 1
    assert "Traceback" not in err
