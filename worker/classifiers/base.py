"""The classifier interface every implementation plugs into."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Classification:
    """What a classifier says about one text."""

    label: str
    confidence: float
    classifier: str


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
