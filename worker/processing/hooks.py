"""Steps that cut across a message's work, in dramatiq's middleware style.

The pipeline calls each hook at one place of every message's path, whatever path brought the
message there; a hook may raise to fail that message's attempt (``before_classify``) or end the
process (the fault points of ``worker.processing.faults``). The default hooks do nothing.
"""

from __future__ import annotations


class Hooks:
    """No-op hooks; subclasses override the points they care about."""

    __slots__ = ()

    def before_process(self, message_id: str) -> None:
        """The message is claimed and its work is about to start."""

    def before_classify(self, message_id: str) -> None:
        """The text is about to be classified; raising fails this attempt."""

    def after_publish(self, message_id: str) -> None:
        """The broker confirmed the result; the completion is not written yet."""

    def after_complete(self, message_id: str) -> None:
        """The completion ran; the delivery is not acknowledged yet."""
