"""The value a classifier returns about one text.

It lives in the shared types because two layers that must not import each other use it: the
classification layer produces it and the AMQP layer writes it into a result message.
"""

from __future__ import annotations

from typing import NamedTuple


class Classification(NamedTuple):
    """What a classifier says about one text."""

    label: str
    confidence: float
    classifier: str
