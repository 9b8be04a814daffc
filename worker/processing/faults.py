"""Fault injection for tests and chaos drills: ``FAULT_INJECTION=point:id_prefix[,point:id_prefix]``.

Points: ``kill_after_claim``, ``kill_after_publish``, ``kill_after_complete`` (the process SIGKILLs
itself, as a crash would: nothing is flushed or acknowledged) and ``fail_classify`` (the
classification raises a transient error). A point fires for message IDs starting with the prefix.
Empty by default; a production deployment never sets it.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

from worker.core.errors import ClassifierUnavailable, ConfigError
from worker.processing.hooks import Hooks

POINTS = frozenset(
    {"kill_after_claim", "kill_after_publish", "kill_after_complete", "fail_classify"}
)


@dataclass(frozen=True, slots=True)
class Faults(Hooks):
    """The fault points, as the pipeline's hooks: each fires where its name says."""

    rules: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, spec: str) -> Faults:
        rules = []
        for item in filter(None, (part.strip() for part in spec.split(","))):
            point, _, prefix = item.partition(":")
            if point not in POINTS:
                raise ConfigError(
                    f"invalid setting FAULT_INJECTION: unknown point {point!r} "
                    f"(known: {', '.join(sorted(POINTS))})"
                )
            rules.append((point, prefix))
        return cls(tuple(rules))

    def hit(self, point: str, message_id: str) -> None:
        """Fire ``point`` if a rule names it for this message ID."""
        for rule_point, prefix in self.rules:
            if rule_point == point and message_id.startswith(prefix):
                if point == "fail_classify":
                    raise ClassifierUnavailable("injected classification failure")
                os.kill(os.getpid(), signal.SIGKILL)

    def before_process(self, message_id: str) -> None:
        self.hit("kill_after_claim", message_id)

    def before_classify(self, message_id: str) -> None:
        self.hit("fail_classify", message_id)

    def after_publish(self, message_id: str) -> None:
        self.hit("kill_after_publish", message_id)

    def after_complete(self, message_id: str) -> None:
        self.hit("kill_after_complete", message_id)
