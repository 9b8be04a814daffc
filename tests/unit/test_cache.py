"""Cache keys: normalisation, classifier identity, and the local LRU tier."""

from __future__ import annotations

import os
import subprocess
import sys

from worker.classification.cache import ClassificationCache, LocalCache
from worker.classification.classifiers.base import Classification
from worker.classification.text import normalise, text_hash
from worker.redisio.keys import RedisKeys

KEYS = RedisKeys("unit:")


def key_of(text: str, identity: str = "keywords:v1") -> str:
    """The Redis key a replica with a classifier of ``identity`` stores ``text`` under."""
    cache = ClassificationCache(LocalCache(1), link=None, keys=KEYS, identity=identity, ttl_s=1)
    return cache.redis_key(text_hash(text))


def test_normalisation_folds_whitespace_and_unicode_forms() -> None:
    """Texts differing only in spacing or Unicode composition share a cache key."""
    assert normalise("  Привет,\n\tмир  ") == "Привет, мир"
    assert key_of("café") == key_of("cafe\u0301")
    assert key_of("a  b") == key_of(" a b ")
    assert key_of("Ｆｕｌｌ width") == key_of("Full width")


def test_different_texts_or_classifiers_never_share_a_key() -> None:
    """Texts that differ after normalisation, and classifiers with another identity (model,
    prompt, version), get keys of their own."""
    texts = ["a b", "a c", "A b", "ab", "a b.", "Где мой заказ?", "Где мой заказ"]
    assert len({key_of(text) for text in texts}) == len(texts)
    identities = ["llm:gpt-a:prompt1", "llm:gpt-b:prompt1", "llm:gpt-a:prompt2", "keywords:v1"]
    assert len({key_of("hi", identity) for identity in identities}) == len(identities)


def test_every_process_builds_the_same_key() -> None:
    """A key does not depend on the process (no salted ``hash()``): replicas share entries."""
    code = (
        "from worker.classification.cache import ClassificationCache, LocalCache\n"
        "from worker.classification.text import text_hash\n"
        "from worker.redisio.keys import RedisKeys\n"
        "for text, identity in (('Где мой заказ?', 'keywords:v1'), ('hi', 'llm:m')):\n"
        "    cache = ClassificationCache(\n"
        "        LocalCache(1), link=None, keys=RedisKeys('unit:'), identity=identity, ttl_s=1\n"
        "    )\n"
        "    print(cache.redis_key(text_hash(text)))\n"
    )
    other = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={
            "PYTHONHASHSEED": "12345",
            "PYTHONIOENCODING": "utf-8",
            "PYTHONPATH": os.pathsep.join(sys.path),
        },
    )
    assert other.stdout.split() == [key_of("Где мой заказ?"), key_of("hi", "llm:m")]


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
