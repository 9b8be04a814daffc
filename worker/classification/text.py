"""Text normalisation and hashing: what makes two messages "the same text" for the cache.

The hash is the cache key's text part, and the only trace of a message's text that logs may show.
"""

from __future__ import annotations

import hashlib
import unicodedata


def normalise(text: str) -> str:
    """Unicode NFKC, whitespace runs folded to one space, ends trimmed."""
    return " ".join(unicodedata.normalize("NFKC", text).split())


def text_hash(text: str) -> str:
    """128-bit hash of the normalised text: the cache key's text part, and what logs may show."""
    return hashlib.blake2b(normalise(text).encode(), digest_size=16).hexdigest()
