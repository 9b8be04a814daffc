"""Helpers for integration tests: replicas as real processes, a results sink, publishing.

Replicas are started and watched by the package's harness (``worker.cli.replicas``), the same one
the demo and the benchmark use.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import orjson
import redis.asyncio as aioredis
from hypothesis import strategies as st

from tests.conftest import RABBITMQ_URL, Names
from worker.cli import publish
from worker.cli.replicas import ReplicaGroup, ReplicaProcess, listen_for_results
from worker.observability.metrics import CounterName

Replica = ReplicaProcess  # the package's harness: one ``neiromatrius-worker run`` process


class Replicas(ReplicaGroup):
    """Starts replicas for a test (logs in its ``tmp_path``) and makes sure none outlives it."""

    def close(self) -> None:
        self.kill()


async def bind_results(
    connection: aio_pika.abc.AbstractRobustConnection,
    names: Names,
    on_result: Callable[[aio_pika.abc.AbstractIncomingMessage], Awaitable[None]],
) -> None:
    """Consume every result of the test's results exchange (declared here if need be)."""
    await listen_for_results(connection, names.results_exchange, on_result)


class ResultSink:
    """Collects every result published on the test's results exchange, by message ID."""

    def __init__(self, names: Names) -> None:
        self._names = names
        self.by_id: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.total = 0
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None

    async def __aenter__(self) -> ResultSink:
        self._connection = await aio_pika.connect_robust(RABBITMQ_URL)
        await bind_results(self._connection, self._names, self._on_result)
        return self

    async def _on_result(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        body = orjson.loads(message.body)
        body["_routing_key"] = message.routing_key
        body["_amqp_message_id"] = message.message_id
        self.by_id[body["message_id"]].append(body)
        self.total += 1

    async def wait_for_ids(self, ids: set[str], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if ids <= self.by_id.keys():
                return
            await asyncio.sleep(0.05)
        missing = ids - self.by_id.keys()
        raise AssertionError(f"{len(missing)} of {len(ids)} results missing after {timeout_s}s")

    async def settle(self, quiet_s: float = 1.0) -> None:
        """Wait until no result has arrived for ``quiet_s`` (late duplicates would show up here)."""
        last = -1
        while last != self.total:
            last = self.total
            await asyncio.sleep(quiet_s)

    async def __aexit__(self, *exc_info: object) -> None:
        if self._connection is not None:
            await self._connection.close()


async def publish_bodies(names: Names, bodies: list[dict[str, Any]]) -> None:
    await publish.publish(RABBITMQ_URL, names.input_queue, publish.from_bodies(bodies))


async def publish_raw(names: Names, raw: list[tuple[bytes, str | None]]) -> None:
    await publish.publish(
        RABBITMQ_URL,
        names.input_queue,
        [publish.Outgoing(body, message_id) for body, message_id in raw],
    )


async def cluster_counters(client: aioredis.Redis, names: Names) -> dict[str, int]:
    raw = await client.hgetall(names.keys.stats)
    values = {k.decode(): int(v) for k, v in raw.items()}
    return {c.value: values.get(c.value, 0) for c in CounterName}


async def wait_counter(
    client: aioredis.Redis,
    names: Names,
    counter: CounterName,
    expected: int,
    timeout_s: float = 10.0,
) -> dict[str, int]:
    """Wait until a cluster counter reaches ``expected`` (counters flush every heartbeat)."""
    deadline = time.monotonic() + timeout_s
    counters = await cluster_counters(client, names)
    while counters[counter] < expected and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        counters = await cluster_counters(client, names)
    return counters


async def drain_queue(
    names: Names, queue_name: str, timeout_s: float = 5.0, expected: int | None = None
) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Take every message currently in ``queue_name`` (waiting for ``expected`` if given)."""
    connection = await aio_pika.connect_robust(RABBITMQ_URL)
    taken: list[aio_pika.abc.AbstractIncomingMessage] = []
    try:
        channel = await connection.channel()
        # Passive: the replicas declared it (a quorum queue refuses a declaration without its type).
        queue = await channel.declare_queue(queue_name, passive=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            message = await queue.get(no_ack=True, fail=False)
            if message is None:
                if expected is None or len(taken) >= expected:
                    break
                await asyncio.sleep(0.1)
                continue
            taken.append(message)
    finally:
        await connection.close()
    return taken


def body(message_id: str, text: str, **extra: Any) -> dict[str, Any]:
    return {"message_id": message_id, "text": text, "chat_id": "chat-1", **extra}


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


# --- Hostile input: a catalogue of malformed deliveries and a generator of random bodies ---------

HOSTILE_MAX_BYTES = 16_384  # MAX_MESSAGE_BYTES of the replicas that receive the catalogue


@dataclass(frozen=True)
class Hostile:
    """One malformed delivery and the dead-letter reason the worker must give it."""

    name: str
    body: bytes
    reason: str
    amqp_message_id: str | None = None


def _json(**fields: Any) -> bytes:
    return orjson.dumps(fields)


def _nested(levels: int) -> Any:
    value: Any = "bottom"
    for _ in range(levels):
        value = {"deeper": value}
    return value


HOSTILE: list[Hostile] = [
    Hostile("plain text", b"this is not json", "not_json"),
    Hostile("empty body", b"", "not_json"),
    Hostile("whitespace body", b"  \n\t ", "not_json"),
    Hostile("truncated JSON", b'{"message_id": "h-trunc", "text": "half a messa', "not_json"),
    Hostile("trailing garbage", b'{"message_id": "h-tail", "text": "hi"} and more', "not_json"),
    Hostile(
        "two objects", b'{"message_id": "h-2a", "text": "a"}{"message_id": "h-2b"}', "not_json"
    ),
    Hostile("invalid UTF-8", b'{"message_id": "h-utf8", "text": "\xff\xfe\xc3"}', "not_json"),
    Hostile("lone surrogate", b'{"message_id": "h-sur", "text": "\\ud800 alone"}', "not_json"),
    Hostile("byte order mark", b'\xef\xbb\xbf{"message_id": "h-bom", "text": "hi"}', "not_json"),
    Hostile("NaN", b'{"message_id": "h-nan", "text": "hi", "score": NaN}', "not_json"),
    Hostile("number overflow", b'{"message_id": "h-inf", "text": "hi", "n": 1e999}', "not_json"),
    Hostile("JSON array", b'["h-array", "text"]', "not_object"),
    Hostile("JSON string", b'"just a string"', "not_object"),
    Hostile("JSON number", b"42", "not_object"),
    Hostile("JSON null", b"null", "not_object"),
    Hostile("JSON true", b"true", "not_object"),
    Hostile(
        "deep nesting", _json(message_id="h-deep", text="hi", metadata=_nested(100)), "too_deep"
    ),
    Hostile("nesting past the parser", b"[" * 2_000, "too_deep"),
    Hostile(
        "duplicate message_id",
        b'{"message_id": "h-dup-a", "text": "hi", "message_id": "h-dup-b"}',
        "duplicate_keys",
    ),
    Hostile(
        "duplicate text, escaped",
        b'{"message_id": "h-dup-t", "text": "ok", "\\u0074ext": "hidden"}',
        "duplicate_keys",
    ),
    Hostile("numeric id", _json(message_id=17, text="id is a number"), "bad_message_id"),
    Hostile("list id", _json(message_id=["h"], text="id is a list"), "bad_message_id"),
    Hostile("object id", _json(message_id={"id": 1}, text="id is an object"), "bad_message_id"),
    Hostile("boolean id", _json(message_id=True, text="id is a boolean"), "bad_message_id"),
    Hostile("empty id", _json(message_id="", text="id is empty"), "bad_message_id"),
    Hostile("blank id", _json(message_id="   ", text="id is blank"), "bad_message_id"),
    Hostile("10 KB id", _json(message_id="i" * 10_240, text="id of 10 KB"), "bad_message_id"),
    Hostile(
        "NUL in id", _json(message_id="h-\x00-nul", text="control character"), "bad_message_id"
    ),
    Hostile(
        "newline in id", _json(message_id="h-\n-nl", text="control character"), "bad_message_id"
    ),
    Hostile("invisible id", _json(message_id="\u200b", text="zero-width id"), "bad_message_id"),
    Hostile(
        "control characters in the AMQP id",
        _json(text="id only in the AMQP property"),
        "bad_message_id",
        amqp_message_id="h-\x07\x1b-prop",
    ),
    Hostile("no text", _json(message_id="h-notext"), "no_text"),
    Hostile("null text", _json(message_id="h-nulltext", text=None), "no_text"),
    Hostile("numeric text", _json(message_id="h-numtext", text=12), "bad_text"),
    Hostile("list text", _json(message_id="h-listtext", text=["a"]), "bad_text"),
    Hostile("object text", _json(message_id="h-objtext", text={"a": "b"}), "bad_text"),
    Hostile("boolean text", _json(message_id="h-booltext", text=False), "bad_text"),
    Hostile("empty text", _json(message_id="h-empty", text=""), "empty_text"),
    Hostile("whitespace text", _json(message_id="h-ws", text=" \t\n\u3000\u00a0 "), "empty_text"),
    Hostile(
        "over MAX_MESSAGE_BYTES",
        _json(message_id="h-big", text="x" * (HOSTILE_MAX_BYTES + 1)),
        "too_large",
    ),
]


def random_bodies() -> st.SearchStrategy[bytes]:
    """Bodies a careless or hostile producer might send: random bytes, random JSON of any shape,
    objects with the right keys holding anything, and valid bodies truncated or with a byte changed."""
    scalars = (
        st.none()
        | st.booleans()
        | st.integers(min_value=-(2**63), max_value=2**63 - 1)
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=40)
    )
    values = st.recursive(
        scalars,
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(st.text(max_size=10), children, max_size=4)
        ),
        max_leaves=12,
    )
    keyed = st.fixed_dictionaries(
        {}, optional={"message_id": values, "text": values, "chat_id": values, "metadata": values}
    )
    valid = st.builds(
        lambda i, text: orjson.dumps({"message_id": f"r-{i}", "text": text}),
        st.integers(0, 10**6),
        st.text(min_size=1, max_size=40),
    )
    truncated = st.tuples(valid, st.integers(0, 60)).map(lambda t: t[0][: t[1]])
    flipped = st.tuples(valid, st.integers(0, 60), st.integers(0, 255)).map(
        lambda t: t[0][: t[1]] + bytes([t[2]]) + t[0][t[1] + 1 :]
    )
    return st.one_of(
        st.binary(max_size=200),
        values.map(orjson.dumps),
        keyed.map(orjson.dumps),
        truncated,
        flipped,
    )


# --- Closing a replica's broker connections from the broker's side (rabbitmqctl) ----------------


def rabbitmqctl_usable() -> bool:
    """Whether this test run can manage the broker it talks to with rabbitmqctl (a local one)."""
    host = urlsplit(RABBITMQ_URL).hostname
    return shutil.which("rabbitmqctl") is not None and host in {"127.0.0.1", "localhost"}


def broker_connections(name_prefix: str) -> list[str]:
    """Broker-side process IDs of the open connections whose client name starts with ``name_prefix``."""
    listed = subprocess.run(
        ["rabbitmqctl", "list_connections", "pid", "client_properties", "-q", "--no-table-headers"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    wanted = f'{{"connection_name","{name_prefix}'
    return [line.split("\t", 1)[0] for line in listed.splitlines() if wanted in line]


def close_broker_connections(connection_pids: list[str]) -> None:
    """Have the broker close these connections (CONNECTION_FORCED), as an operator or a failover would."""
    for pid in connection_pids:
        subprocess.run(
            ["rabbitmqctl", "close_connection", pid, "closed by a reliability test"],
            capture_output=True,
            timeout=30,
            check=True,
        )


def run_cli(env: dict[str, str], *args: str, timeout_s: float = 60) -> tuple[int, list[str]]:
    """``python -m worker ARGS`` in a process of its own: its exit code and the lines of its
    stdout and stderr."""
    done = subprocess.run(
        [sys.executable, "-m", "worker", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    return done.returncode, (done.stdout + done.stderr).splitlines()
