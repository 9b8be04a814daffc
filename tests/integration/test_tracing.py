"""Tracing across the queue, against the real RabbitMQ and Redis: a replica runs in this process
(``worker.app.run_replica``) so that the SDK's in-memory exporter sees its spans."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import aio_pika
import orjson
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from tests.conftest import RABBITMQ_URL, Names
from tests.integration.support import body
from worker.amqp import fastpath
from worker.amqp.declaring import ensure_queue
from worker.app import run_replica
from worker.cli.replicas import listen_for_results
from worker.core.settings import Settings, load_settings
from worker.observability import tracing

pytestmark = pytest.mark.integration

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"
OTHER_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


def traceparent(trace_id: str, parent_id: str = PARENT_ID) -> str:
    return f"00-{trace_id}-{parent_id}-01"


class Results:
    """Every result on the test's exchange: its body and its AMQP headers, by message ID."""

    def __init__(self) -> None:
        self.headers: dict[str, list[dict[str, Any]]] = {}
        self.arrived = asyncio.Event()

    async def on_result(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        message_id = orjson.loads(message.body)["message_id"]
        self.headers.setdefault(message_id, []).append(dict(message.headers or {}))
        self.arrived.set()

    async def wait_for(self, message_id: str, timeout_s: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while message_id not in self.headers:
            self.arrived.clear()
            await asyncio.wait_for(self.arrived.wait(), timeout=deadline - time.monotonic())
        return self.headers[message_id][0]


@asynccontextmanager
async def replica_in_process(
    names: Names, monkeypatch: pytest.MonkeyPatch, **env: str
) -> AsyncIterator[Results]:
    """One replica of this test's names in this process, and a listener of its results."""
    for name, value in names.env(**env).items():
        monkeypatch.setenv(name, value)
    results = Results()
    connection = await aio_pika.connect_robust(RABBITMQ_URL)
    stop = asyncio.Event()
    replica = asyncio.ensure_future(run_replica(Settings(), stop))
    try:
        await listen_for_results(connection, names.results_exchange, results.on_result)
        yield results
    finally:
        stop.set()
        await asyncio.wait_for(replica, timeout=15)
        fastpath.uninstall()  # run_replica installed it in this process
        await connection.close()


async def publish(names: Names, message_id: str, text: str, headers: dict[str, str]) -> None:
    connection = await aio_pika.connect_robust(RABBITMQ_URL)
    try:
        # Used as it is if the replica declared it first, else declared as the replica would.
        arguments = names.topology(load_settings()).input_arguments()
        await ensure_queue(connection, names.input_queue, arguments)
        channel = await connection.channel()
        message = aio_pika.Message(orjson.dumps(body(message_id, text)), headers=dict(headers))
        await channel.default_exchange.publish(message, routing_key=names.input_queue)
    finally:
        await connection.close()


async def finished_span(
    exporter: InMemorySpanExporter, found: Callable[[ReadableSpan], bool], timeout_s: float = 10.0
) -> ReadableSpan:
    """The first finished span ``found`` accepts (spans end when their delivery is settled)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for span in exporter.get_finished_spans():
            if found(span):
                return span
        await asyncio.sleep(0.02)
    raise AssertionError("no such span finished in time")


def consumer_of(exporter: InMemorySpanExporter, message_id: str) -> Callable[[ReadableSpan], bool]:
    def found(span: ReadableSpan) -> bool:
        return (
            span.kind is SpanKind.CONSUMER
            and (span.attributes or {}).get("messaging.message.id") == message_id
            and not (span.attributes or {}).get("neiromatrius.duplicate", False)
        )

    return found


def children(exporter: InMemorySpanExporter, parent: ReadableSpan) -> dict[str, ReadableSpan]:
    return {
        span.name: span
        for span in exporter.get_finished_spans()
        if span.parent is not None and span.parent.span_id == parent.context.span_id
    }


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    spans = InMemorySpanExporter()
    with tracing.exporting_to(spans):
        yield spans


@pytest.mark.usefixtures("amqp", "redis_client")
async def test_a_traceparent_continues_through_the_worker_into_the_result(
    names: Names, monkeypatch: pytest.MonkeyPatch, exporter: InMemorySpanExporter
) -> None:
    """A message carrying a traceparent gets a consumer span of that trace with claim, cache
    lookup (a miss, then a hit for the same text) and publish children, its result carries the
    trace on, and a second copy of it gets a span of its own trace saying it is a duplicate."""
    env = {"OTEL_TRACES_EXPORTER": "discard", "OTEL_SERVICE_NAME": "tracing-test"}
    async with replica_in_process(names, monkeypatch, **env) as results:
        await publish(names, "t-1", "what is my balance", {"traceparent": traceparent(TRACE_ID)})
        headers = await results.wait_for("t-1")
        span = await finished_span(exporter, consumer_of(exporter, "t-1"))
        await publish(names, "t-2", "what is my balance", {})
        await results.wait_for("t-2")
        hit = await finished_span(exporter, consumer_of(exporter, "t-2"))
        await publish(
            names, "t-1", "what is my balance", {"traceparent": traceparent(OTHER_TRACE_ID)}
        )
        duplicate = await finished_span(
            exporter, lambda s: (s.attributes or {}).get("neiromatrius.duplicate") is True
        )

    assert span.context.trace_id == int(TRACE_ID, 16)
    assert span.parent is not None
    assert span.parent.span_id == int(PARENT_ID, 16)
    assert span.resource.attributes["service.name"] == "tracing-test"
    assert (span.attributes or {})["neiromatrius.outcome"] == "ack"
    found = children(exporter, span)
    assert {"claim", "cache lookup", "publish"} <= found.keys()
    assert (found["claim"].attributes or {})["neiromatrius.claim.status"] == "claimed"
    assert (found["cache lookup"].attributes or {})["neiromatrius.cache.hit"] is False
    classify = children(exporter, found["cache lookup"])["classify"]
    assert (classify.attributes or {})["neiromatrius.classifier"].startswith("keywords")
    assert found["publish"].kind is SpanKind.PRODUCER

    _, trace_id, parent_id, _ = headers["traceparent"].split("-")
    assert trace_id == TRACE_ID
    assert int(parent_id, 16) == found["publish"].context.span_id

    assert hit.parent is None  # no traceparent: a trace of its own
    assert (children(exporter, hit)["cache lookup"].attributes or {})["neiromatrius.cache.hit"]
    assert duplicate.context.trace_id == int(OTHER_TRACE_ID, 16)
    assert (duplicate.attributes or {})["messaging.message.id"] == "t-1"
    assert "publish" not in children(exporter, duplicate)
    assert len(results.headers["t-1"]) == 1  # the duplicate published nothing


@pytest.mark.usefixtures("amqp", "redis_client")
async def test_an_unsampled_message_still_carries_its_trace_into_the_result(
    names: Names, monkeypatch: pytest.MonkeyPatch, exporter: InMemorySpanExporter
) -> None:
    """With the sampler saying no, nothing is exported, yet the result carries the input's
    trace on (not sampled), so that the trace stays whole downstream."""
    env = {"OTEL_TRACES_EXPORTER": "discard", "OTEL_TRACES_SAMPLER": "always_off"}
    async with replica_in_process(names, monkeypatch, **env) as results:
        await publish(names, "u-1", "hello there", {"traceparent": traceparent(TRACE_ID)})
        headers = await results.wait_for("u-1")
    assert headers["traceparent"].startswith(f"00-{TRACE_ID}-")
    assert headers["traceparent"].endswith("-00")
    assert exporter.get_finished_spans() == ()


@pytest.mark.usefixtures("amqp", "redis_client")
async def test_tracing_is_off_by_default(
    names: Names, monkeypatch: pytest.MonkeyPatch, exporter: InMemorySpanExporter
) -> None:
    """Without OTEL_* settings no span is made and the result has no trace headers, though the
    input had a traceparent."""
    async with replica_in_process(names, monkeypatch) as results:
        await publish(names, "o-1", "hello there", {"traceparent": traceparent(TRACE_ID)})
        headers = await results.wait_for("o-1")
    assert "traceparent" not in headers
    assert exporter.get_finished_spans() == ()


OFF_SCRIPT = """
import sys
import worker.cli.main
from worker.core.settings import Settings
from worker.processing.faults import Faults
from worker.processing.traced import pipeline_hooks
import worker.app
assert isinstance(pipeline_hooks(Settings()), Faults)
print(sorted(name for name in sys.modules if name.startswith(TRACING_MODULES)))
"""
# What the worker's tracing would import. (redis-py 7 imports the OpenTelemetry API and metrics
# SDK by itself where they are installed, for its own metrics: not ours to avoid.)
TRACING_MODULES = (
    "opentelemetry.sdk.trace",
    "opentelemetry.exporter",
    "opentelemetry.trace.propagation.tracecontext",
)


def test_tracing_off_imports_nothing_of_the_tracing_sdk(names: Names) -> None:
    """A worker process with tracing off (the default, or OTEL_SDK_DISABLED) builds its hooks
    without importing OpenTelemetry's tracing SDK, exporters or propagator."""
    for extra in ({}, {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}):
        done = subprocess.run(
            [sys.executable, "-c", f"TRACING_MODULES = {TRACING_MODULES!r}\n{OFF_SCRIPT}"],
            env=names.env(**extra),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "[]"
