"""The classifier interface every implementation plugs into.

``Classification`` itself is a shared type (``worker.core.classification``) because the AMQP layer
writes it into results; it is re-exported here so a classifier needs one import.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from worker.core.classification import Classification

__all__ = ["Classification", "Classifier", "Immediate"]


class Classifier(Protocol):
    """Turns a text into a label.

    ``identity`` names the classifier, its version and everything that can change its answer
    (model, prompt, label set, keyword data); cache keys are derived from it, so a change of
    identity makes earlier cached answers miss instead of being served stale.
    """

    @property
    def name(self) -> str: ...

    @property
    def identity(self) -> str: ...

    async def classify(self, text: str) -> Classification: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class Immediate(Protocol):
    """A classifier that can also answer without awaiting: no I/O, no simulated latency. When
    ``immediate`` is true, ``classify_sync`` is called inline for a batch of texts instead of one
    task per text."""

    @property
    def immediate(self) -> bool: ...

    def classify_sync(self, text: str) -> Classification: ...
