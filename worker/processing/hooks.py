"""Steps that cut across a message's work, in dramatiq's middleware style.

The inbox and the pipeline call each hook at one place of every message's path, whatever path
brought the message there; a hook may raise to fail that message's attempt (``before_classify``)
or end the process (the fault points of ``worker.processing.faults``). The default hooks do
nothing. The points of a pass or a batch are called once for all its messages (so that a hook
nobody overrides costs one call per batch); ``before_process`` to ``after_complete`` once per
message. ``Chain`` runs several hooks in order (the fault points and tracing).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from worker.amqp.acks import Outcome
from worker.amqp.delivery import Delivery
from worker.classification.cached import Classified
from worker.core.models import ChatMessage
from worker.processing.work import Claimed, Work

Answers = Sequence[Classified | Exception]


class Hooks:
    """No-op hooks; subclasses override the points they care about."""

    __slots__ = ()

    def before_claim(self, parsed: Sequence[tuple[Delivery, ChatMessage]]) -> None:
        """A pass is about to claim the IDs of these parsed deliveries."""

    def claimed(self, items: Sequence[Claimed]) -> None:
        """The claims' answers are in (of a pass, or of a follow-up's claim resolved)."""

    def on_duplicate(self, item: Claimed, redelivered: bool) -> None:
        """The ID is done already: the delivery is acked without work (``redelivered``: a
        redelivery or retry copy of a done ID, not a copy the producer sent twice)."""

    def settled(self, delivery: Delivery, outcome: Outcome) -> None:
        """The delivery is settled (acked or requeued), once, whatever became of it."""

    def before_process(self, message_id: str) -> None:
        """The message is claimed and its work is about to start."""

    def before_classify(self, message_id: str) -> None:
        """The text is about to be classified; raising fails this attempt."""

    def classified(
        self, batch: Sequence[Work], asked: Sequence[int], answers: Answers, started_ns: int
    ) -> None:
        """The batch's one classification call (started at ``started_ns``, ``time.time_ns``)
        answered ``answers[k]`` for ``batch[asked[k]]``."""

    def result_headers(self, work: Work) -> Mapping[str, str] | None:
        """Headers for the result of ``work``, about to be queued (``None``: none)."""
        return None

    def published(self, batch: Sequence[Work], published: Sequence[int]) -> None:
        """The broker confirmed the results of ``batch[i]`` for each ``i`` of ``published``."""

    def after_publish(self, message_id: str) -> None:
        """The broker confirmed the result; the completion is not written yet."""

    def after_complete(self, message_id: str) -> None:
        """The completion ran; the delivery is not acknowledged yet."""


class Chain(Hooks):
    """Several hooks, each point called on each of them in order."""

    __slots__ = ("hooks",)

    def __init__(self, *hooks: Hooks) -> None:
        self.hooks = hooks

    def before_claim(self, parsed: Sequence[tuple[Delivery, ChatMessage]]) -> None:
        for hook in self.hooks:
            hook.before_claim(parsed)

    def claimed(self, items: Sequence[Claimed]) -> None:
        for hook in self.hooks:
            hook.claimed(items)

    def on_duplicate(self, item: Claimed, redelivered: bool) -> None:
        for hook in self.hooks:
            hook.on_duplicate(item, redelivered)

    def settled(self, delivery: Delivery, outcome: Outcome) -> None:
        for hook in self.hooks:
            hook.settled(delivery, outcome)

    def before_process(self, message_id: str) -> None:
        for hook in self.hooks:
            hook.before_process(message_id)

    def before_classify(self, message_id: str) -> None:
        for hook in self.hooks:
            hook.before_classify(message_id)

    def classified(
        self, batch: Sequence[Work], asked: Sequence[int], answers: Answers, started_ns: int
    ) -> None:
        for hook in self.hooks:
            hook.classified(batch, asked, answers, started_ns)

    def result_headers(self, work: Work) -> Mapping[str, str] | None:
        """The headers of every hook that has some, merged (a later hook's win)."""
        merged: dict[str, str] = {}
        for hook in self.hooks:
            if (headers := hook.result_headers(work)) is not None:
                merged.update(headers)
        return merged or None

    def published(self, batch: Sequence[Work], published: Sequence[int]) -> None:
        for hook in self.hooks:
            hook.published(batch, published)

    def after_publish(self, message_id: str) -> None:
        for hook in self.hooks:
            hook.after_publish(message_id)

    def after_complete(self, message_id: str) -> None:
        for hook in self.hooks:
            hook.after_complete(message_id)


def chain(*hooks: Hooks) -> Hooks:
    """``hooks`` as one: the only one itself (no extra call per point), else a ``Chain``."""
    return hooks[0] if len(hooks) == 1 else Chain(*hooks)
