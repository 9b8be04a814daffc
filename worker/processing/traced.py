"""Tracing across the queue, as the pipeline's hooks (``worker.observability.tracing``).

One consumer span per delivery, child of the ``traceparent`` in its AMQP headers, from the moment
its pass claims it until it is settled; under it a ``claim`` span (the pass's claim round trip),
a ``cache lookup`` span (hit or miss; on a miss a ``classify`` span under it, naming the
classifier) covering the batch's one classification call, and a ``publish`` span from the queued
result to the broker's confirm, whose context the result carries on in its headers. A duplicate's
span says so (``neiromatrius.duplicate``). Spans that are not sampled are made but not recorded:
then only the consumer span is made, and its context is what the result carries on.

Built only when tracing is on (``pipeline_hooks``): otherwise the pipeline has its fault points
alone and nothing here runs.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from worker.amqp.acks import Outcome
from worker.amqp.delivery import Delivery
from worker.core.models import ChatMessage
from worker.core.settings import Settings
from worker.observability.tracing import Tracing, build_tracing
from worker.processing.faults import Faults
from worker.processing.hooks import Answers, Hooks, chain
from worker.processing.work import Claimed, Work

if TYPE_CHECKING:
    from opentelemetry.trace import Span

DUPLICATE = "neiromatrius.duplicate"


class _Trace:
    """The open spans of one delivery."""

    __slots__ = ("claim", "publish", "span")

    def __init__(self, span: Span, claim: Span | None) -> None:
        self.span = span
        self.claim = claim
        self.publish: Span | None = None


class TracedHooks(Hooks):
    """The spans of every delivery the inbox takes; see the module docstring."""

    __slots__ = ("_name", "_open", "_queue", "_tracing")

    def __init__(self, tracing: Tracing, queue: str) -> None:
        self._tracing = tracing
        self._queue = queue
        self._name = f"{queue} process"
        self._open: dict[Delivery, _Trace] = {}

    def _start(self, delivery: Delivery, message_id: str, now: int, claim: bool) -> _Trace:
        attributes = {
            "messaging.system": "rabbitmq",
            "messaging.operation.type": "process",
            "messaging.destination.name": self._queue,
            "messaging.message.id": message_id,
        }
        span = self._tracing.consumer(self._name, delivery.headers, now, attributes)
        recording = span.is_recording()
        traced = _Trace(
            span, self._tracing.child(span, "claim", now) if claim and recording else None
        )
        self._open[delivery] = traced
        return traced

    def before_claim(self, parsed: Sequence[tuple[Delivery, ChatMessage]]) -> None:
        now = time.time_ns()
        for delivery, message in parsed:
            self._start(delivery, message.message_id, now, claim=True)

    def claimed(self, items: Sequence[Claimed]) -> None:
        now = time.time_ns()
        for item in items:
            traced = self._open.get(item.delivery)
            if traced is None:
                traced = self._start(item.delivery, item.message.message_id, now, claim=False)
            status = item.claim.status.value
            if traced.claim is not None:
                traced.claim.set_attribute("neiromatrius.claim.status", status)
                traced.claim.end(now)
                traced.claim = None
            elif traced.span.is_recording():
                traced.span.add_event("claim_resolved", {"neiromatrius.claim.status": status})

    def on_duplicate(self, item: Claimed, redelivered: bool) -> None:
        traced = self._open.get(item.delivery) or self._start(
            item.delivery, item.message.message_id, time.time_ns(), claim=False
        )
        traced.span.set_attribute(DUPLICATE, True)
        traced.span.set_attribute("neiromatrius.redelivered_done", redelivered)

    def settled(self, delivery: Delivery, outcome: Outcome) -> None:
        traced = self._open.pop(delivery, None)
        if traced is None:
            return
        now = time.time_ns()
        for child in (traced.claim, traced.publish):
            if child is not None:  # the work stopped before its end (requeued, failed)
                child.end(now)
        traced.span.set_attribute("neiromatrius.outcome", outcome.name.lower())
        traced.span.end(now)

    def classified(
        self, batch: Sequence[Work], asked: Sequence[int], answers: Answers, started_ns: int
    ) -> None:
        now = time.time_ns()
        for i, answer in zip(asked, answers, strict=True):
            traced = self._open.get(batch[i].delivery)
            if traced is None or not traced.span.is_recording():
                continue
            if isinstance(answer, Exception):
                lookup = self._tracing.child(traced.span, "cache lookup", started_ns)
                lookup.set_attribute("error.type", type(answer).__name__)
                lookup.end(now)
                continue
            classification, hit = answer
            lookup = self._tracing.child(
                traced.span, "cache lookup", started_ns, {"neiromatrius.cache.hit": hit}
            )
            if not hit:
                attributes = {"neiromatrius.classifier": classification.classifier}
                self._tracing.child(lookup, "classify", started_ns, attributes).end(now)
            lookup.end(now)

    def result_headers(self, work: Work) -> Mapping[str, str] | None:
        traced = self._open.get(work.delivery)
        if traced is None:
            return None
        if not traced.span.is_recording():
            return self._tracing.headers_of(traced.span)
        traced.publish = self._tracing.child(
            traced.span,
            "publish",
            time.time_ns(),
            {"messaging.operation.type": "send"},
            producer=True,
        )
        return self._tracing.headers_of(traced.publish)

    def published(self, batch: Sequence[Work], published: Sequence[int]) -> None:
        now = time.time_ns()
        for i in published:
            traced = self._open.get(batch[i].delivery)
            if traced is not None and traced.publish is not None:
                traced.publish.end(now)
                traced.publish = None


def pipeline_hooks(settings: Settings, *, replica_id: str = "") -> Hooks:
    """The fault points of ``FAULT_INJECTION``, and tracing after them when it is on
    (``Settings.tracing_enabled``); points nobody uses are left out of the chain."""
    faults = Faults.parse(settings.fault_injection)
    tracing = build_tracing(settings, replica_id=replica_id)
    if tracing is None:
        return faults
    traced = TracedHooks(tracing, settings.input_queue)
    return chain(faults, traced) if faults.rules else traced
