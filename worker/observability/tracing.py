"""OpenTelemetry tracing, set up from ``Settings`` only when it is on (the ``otel`` extra).

Nothing of OpenTelemetry is imported unless ``Settings.tracing_enabled``: ``build_tracing``
returns ``None`` then, and the pipeline keeps its plain hooks. When on, one ``TracerProvider``
per replica: the SDK reads its own variables (``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``,
``OTEL_TRACES_SAMPLER`` and ``_ARG``, the OTLP exporter's ``OTEL_EXPORTER_OTLP_*``); the
exporters are the ones ``OTEL_TRACES_EXPORTER`` names (comma-separated; ``otlp`` when only
``OTEL_EXPORTER_OTLP_ENDPOINT`` is set), each behind a ``BatchSpanProcessor``:

- ``otlp``: OTLP over HTTP/protobuf (``opentelemetry-exporter-otlp-proto-http``), or over gRPC
  when only that exporter is installed; ``otlp_proto_http`` / ``otlp_proto_grpc`` name one;
- ``console``: the SDK's console exporter (one JSON document per span on stdout);
- ``discard``: spans are made, sampled and batched as for an exporter, then dropped (what the
  benchmark measures: the cost in the worker, without a collector).

The context crosses the queue as W3C trace context (``traceparent``, ``tracestate``) in the AMQP
headers, whatever ``OTEL_PROPAGATORS`` says: the input's headers are the consumer span's parent,
and every result carries its own span's context on, sampled or not.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from worker.core.errors import ConfigError
from worker.core.settings import Settings

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span

SERVICE_NAME = "neiromatrius-worker"
INSTRUMENTATION = "worker"
TRACE_HEADERS = ("traceparent", "tracestate")
_OTLP = {
    "otlp_proto_http": "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "otlp_proto_grpc": "opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
}
# A test in this process may send every replica's spans here (``exporting_to``).
_test_exporters: list[SpanExporter] = []


class Tracing:
    """The replica's tracer, and the W3C trace context in and out of AMQP headers."""

    def __init__(self, provider: TracerProvider) -> None:
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider = provider
        self._tracer = provider.get_tracer(INSTRUMENTATION)
        self._propagator = TraceContextTextMapPropagator()
        self._in_span = trace.set_span_in_context
        self._consumer = trace.SpanKind.CONSUMER
        self._producer = trace.SpanKind.PRODUCER
        self._internal = trace.SpanKind.INTERNAL

    def consumer(
        self, name: str, headers: Mapping[str, Any], start_ns: int, attributes: dict[str, Any]
    ) -> Span:
        """A consumer span, child of the context in ``headers`` (a root without one)."""
        parent = self._propagator.extract(_text_headers(headers))
        return self._tracer.start_span(
            name, parent, self._consumer, attributes, start_time=start_ns
        )

    def child(
        self,
        parent: Span,
        name: str,
        start_ns: int,
        attributes: dict[str, Any] | None = None,
        *,
        producer: bool = False,
    ) -> Span:
        """A span under ``parent``, started at ``start_ns`` (``time.time_ns``)."""
        kind = self._producer if producer else self._internal
        return self._tracer.start_span(
            name, self._in_span(parent), kind, attributes, start_time=start_ns
        )

    def headers_of(self, span: Span) -> dict[str, str]:
        """``traceparent`` (and ``tracestate``) of ``span``, to carry the context on."""
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier, self._in_span(span))
        return carrier

    def shutdown(self) -> None:
        """Export what is batched and stop the exporters."""
        self.provider.shutdown()


def _text_headers(headers: Mapping[str, Any]) -> dict[str, str]:
    """The trace headers as text (pamqp may hand a long string over as bytes)."""
    found: dict[str, str] = {}
    for name in TRACE_HEADERS:
        value = headers.get(name)
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        if isinstance(value, str):
            found[name] = value
    return found


def build_tracing(settings: Settings, *, replica_id: str = "") -> Tracing | None:
    """The replica's tracing, or ``None`` (nothing imported) when tracing is off."""
    if not settings.tracing_enabled:
        return None
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
    except ImportError as exc:
        raise ConfigError(
            "tracing is configured (OTEL_*) but OpenTelemetry is not installed: "
            "pip install 'neiromatrius-worker[otel]'"
        ) from exc
    resource = Resource.create({"service.instance.id": replica_id} if replica_id else None)
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": SERVICE_NAME}))
    provider = TracerProvider(resource=resource)  # the sampler from OTEL_TRACES_SAMPLER(_ARG)
    for processor in _processors(settings):
        provider.add_span_processor(processor)
    return Tracing(provider)


def _processors(settings: Settings) -> list[Any]:
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    if _test_exporters:
        return [SimpleSpanProcessor(exporter) for exporter in _test_exporters]
    names = [n.strip() for n in (settings.otel_traces_exporter or "otlp").split(",")]
    return [BatchSpanProcessor(_exporter(name)) for name in names if name and name != "none"]


def _exporter(name: str) -> SpanExporter:
    """The exporter ``OTEL_TRACES_EXPORTER`` names (its own settings from its own variables)."""
    import importlib

    from opentelemetry.sdk.trace.export import ConsoleSpanExporter

    if name == "console":
        return ConsoleSpanExporter()
    if name == "discard":
        return _discarding()
    modules = [_OTLP[name]] if name in _OTLP else list(_OTLP.values()) if name == "otlp" else []
    for module in modules:
        with contextlib.suppress(ImportError):
            exporter: SpanExporter = importlib.import_module(module).OTLPSpanExporter()
            return exporter
    known = "otlp, otlp_proto_http, otlp_proto_grpc, console, discard, none"
    if not modules:
        raise ConfigError(f"invalid setting OTEL_TRACES_EXPORTER: {name!r} (known: {known})")
    raise ConfigError(
        f"OTEL_TRACES_EXPORTER={name}: the OTLP exporter is not installed: "
        "pip install 'neiromatrius-worker[otel]'"
    )


def _discarding() -> SpanExporter:
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    class DiscardingExporter(SpanExporter):
        """Drops every span it is handed (``OTEL_TRACES_EXPORTER=discard``)."""

        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    return DiscardingExporter()


@contextlib.contextmanager
def exporting_to(exporter: SpanExporter) -> Iterator[None]:
    """Test seam: replicas set up in this process meanwhile export only to ``exporter``, span by
    span (``SimpleSpanProcessor``), whatever exporter ``OTEL_TRACES_EXPORTER`` names."""
    _test_exporters.append(exporter)
    try:
        yield
    finally:
        _test_exporters.remove(exporter)
