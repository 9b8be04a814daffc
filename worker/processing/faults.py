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

POINTS = frozenset(
    {"kill_after_claim", "kill_after_publish", "kill_after_complete", "fail_classify"}
)


@dataclass(frozen=True, slots=True)
class Faults:
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
