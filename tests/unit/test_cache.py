"""Cache keys: normalisation, classifier identity, and the local LRU tier."""

from __future__ import annotations

from worker.classification.cache import LocalCache, classifier_key, normalise, text_hash
from worker.classification.classifiers.base import Classification


def test_normalisation_folds_whitespace_and_unicode_forms() -> None:
    """Texts differing only in spacing or Unicode composition share a cache key."""
    assert normalise("  Привет,\n\tмир  ") == "Привет, мир"
    assert text_hash("café") == text_hash("cafe\u0301")
    assert text_hash("a  b") == text_hash(" a b ")
    assert text_hash("a b") != text_hash("a c")


def test_classifier_identity_changes_the_key() -> None:
    """A different classifier identity (model, prompt, version) gives a different key part."""
    assert classifier_key("llm:gpt-a:prompt1") != classifier_key("llm:gpt-b:prompt1")
    assert classifier_key("x") == classifier_key("x")


def test_local_cache_is_a_bounded_lru() -> None:
    """The local tier keeps the most recently used entries up to its size."""
    cache = LocalCache(2)
    c = Classification("question", 0.5, "keywords")
    cache.put("a", c)
    cache.put("b", c)
    assert cache.get("a") == c
    cache.put("c", c)
    assert cache.get("b") is None
    assert cache.get("a") == c
    assert cache.get("c") == c
    assert len(cache) == 2
