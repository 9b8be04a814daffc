"""Tracing without servers: the hooks' chain, the tracing set-up, the spans of the processing
layer on the memory store, and a result's trace headers on the fast path's wire format."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from pamqp import frame
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from tests.unit.pipeline_rig import rig
from worker.amqp.fastpath.publishing import content_header
from worker.core.errors import ConfigError
from worker.core.settings import Settings
from worker.observability import tracing
from worker.processing.faults import Faults
from worker.processing.hooks import Chain, Hooks, chain
from worker.processing.traced import TracedHooks, pipeline_hooks
from worker.processing.work import Work

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    spans = InMemorySpanExporter()
    with tracing.exporting_to(spans):
        yield spans


def traced_hooks() -> TracedHooks:
    built = pipeline_hooks(Settings(otel_traces_exporter="discard", input_queue="in"))
    assert isinstance(built, TracedHooks)
    return built


def consumer_spans(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.kind is SpanKind.CONSUMER]


def test_tracing_is_off_without_an_exporter_or_with_the_sdk_disabled() -> None:
    """Without OTEL_* settings, with ``none``, or with the SDK disabled, no tracing is built and
    the pipeline keeps the fault points alone."""
    for settings in (
        Settings(),
        Settings(otel_traces_exporter="none"),
        Settings(otel_exporter_otlp_endpoint="http://127.0.0.1:4318", otel_sdk_disabled=True),
    ):
        assert tracing.build_tracing(settings) is None
        assert isinstance(pipeline_hooks(settings), Faults)


def test_an_unknown_exporter_name_is_a_configuration_error() -> None:
    """``OTEL_TRACES_EXPORTER`` naming no exporter stops start-up with the names it knows."""
    with pytest.raises(ConfigError, match=r"OTEL_TRACES_EXPORTER.*known: otlp"):
        tracing.build_tracing(Settings(otel_traces_exporter="zipkin-please"))


def test_fault_points_and_tracing_are_chained_only_when_both_are_there() -> None:
    """With a fault rule the hooks are a chain of the faults then tracing; without one, tracing
    alone (no call per point for faults that never fire)."""
    assert isinstance(traced_hooks(), TracedHooks)
    both = pipeline_hooks(
        Settings(otel_traces_exporter="discard", fault_injection="fail_classify:x")
    )
    assert isinstance(both, Chain)
    assert [type(h) for h in both.hooks] == [Faults, TracedHooks]


class Recording(Hooks):
    __slots__ = ("calls", "name")

    def __init__(self, name: str, calls: list[str]) -> None:
        self.name = name
        self.calls = calls

    def before_process(self, message_id: str) -> None:
        self.calls.append(f"{self.name}:{message_id}")

    def result_headers(self, work: Work) -> Mapping[str, str] | None:
        return {"from": self.name, self.name: "1"}


def test_a_chain_calls_each_hook_in_order_and_merges_their_headers() -> None:
    """Every point of a chain reaches each hook in order; the result headers of all of them are
    merged, a later hook's value winning; a chain of one is that hook."""
    calls: list[str] = []
    first, second = Recording("a", calls), Recording("b", calls)
    chained = chain(first, second)
    chained.before_process("m")
    assert calls == ["a:m", "b:m"]
    assert chained.result_headers(None) == {"from": "b", "a": "1", "b": "1"}  # type: ignore[arg-type]
    assert chain(first) is first


async def test_every_delivery_gets_one_consumer_span_ended_when_it_is_settled(
    exporter: InMemorySpanExporter,
) -> None:
    """Each message of a pass gets one consumer span (child of its traceparent when it has one)
    with claim, cache lookup and publish children, all ended once its delivery is settled."""
    async with rig(hooks=traced_hooks()) as r:
        for i in range(3):
            r.deliver(
                {"message_id": f"m-{i}", "text": "hello"},
                headers={"traceparent": TRACEPARENT} if i == 0 else None,
            )
        await r.channel.wait_settled(3)
    spans = consumer_spans(exporter)
    assert sorted((s.attributes or {})["messaging.message.id"] for s in spans) == [
        "m-0",
        "m-1",
        "m-2",
    ]
    assert {(s.attributes or {})["neiromatrius.outcome"] for s in spans} == {"ack"}
    traced = next(s for s in spans if s.parent is not None)
    assert traced.context.trace_id == int(TRACEPARENT.split("-")[1], 16)
    names = {s.name for s in exporter.get_finished_spans()}
    assert {"in process", "claim", "cache lookup", "publish"} <= names
    assert all(s.end_time is not None for s in exporter.get_finished_spans())


async def test_a_copy_of_an_id_in_work_gets_a_span_saying_duplicate(
    exporter: InMemorySpanExporter,
) -> None:
    """A second copy of an ID, which waits for the first one's work in this replica and is then
    acked as done, gets a consumer span marked as a duplicate, without a publish."""
    async with rig(hooks=traced_hooks(), classify_delay_s=0.02) as r:
        r.deliver({"message_id": "dup", "text": "hello"})
        r.deliver({"message_id": "dup", "text": "hello"})
        await r.channel.wait_settled(2)
    spans = consumer_spans(exporter)
    duplicates = [s for s in spans if (s.attributes or {}).get("neiromatrius.duplicate")]
    assert len(spans) == 2
    assert len(duplicates) == 1
    assert r.outbox.result_ids() == ["dup"]


async def test_a_failed_attempt_ends_its_spans_too(exporter: InMemorySpanExporter) -> None:
    """A message whose classification fails still has its consumer span ended (it is parked for
    a retry and acked), with its cache lookup never started."""
    faults = Faults.parse("fail_classify:bad")
    hooks = chain(faults, traced_hooks())
    async with rig(hooks=hooks) as r:
        r.deliver({"message_id": "bad-1", "text": "hello"})
        await r.channel.wait_settled(1)
    (span,) = consumer_spans(exporter)
    children = {s.name for s in exporter.get_finished_spans() if s.parent == span.context}
    assert children == {"claim"}
    assert r.outbox.retries


def properties_header(headers: Mapping[str, str] | None, body_size: int = 7) -> bytes:
    properties = Basic.Properties(
        content_type="application/json",
        headers=dict(headers) if headers else None,
        delivery_mode=2,
        message_id="m-1",
        app_id="replica-1",
    )
    return frame.marshal(ContentHeader(0, body_size, properties), 1)


@pytest.mark.parametrize(
    "headers",
    [None, {"traceparent": TRACEPARENT}, {"traceparent": TRACEPARENT, "tracestate": "k=v,x=y"}],
)
def test_the_fast_paths_header_frame_with_trace_headers_is_pamqps(
    headers: Mapping[str, str] | None,
) -> None:
    """A result's content header with trace headers is, byte for byte, what pamqp marshals."""
    assert content_header(1, 7, "m-1", "replica-1", headers) == properties_header(headers)
