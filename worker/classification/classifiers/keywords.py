"""The keyword classifier: embedded, offline and fast, for Russian and English chat messages.

The rules (labels, keywords, weights, signals) and their data file format are in
``keyword_rules``; this module compiles them and matches texts.

Matching: the text is case-folded, ``ё`` is read as ``е`` and typographic apostrophes as ``'``, then
split into words (runs of Unicode letters and digits, apostrophes allowed inside). At each word, every
label whose keyword starts there scores its weight once. Signals: ``question_mark`` fires when the
text contains ``?``; ``url`` fires on ``http``, ``www.`` or a bare domain such as ``site.ru`` or
``t.me/x`` (not an e-mail address). The label with the highest score wins, ties going to the label
listed first; its confidence is ``best / (total + 1)``, so one lone keyword gives 0.5 and agreement
raises it towards 1. When nothing scores, the fallback label wins with ``fallback_confidence``.

``identity`` hashes the canonical form of the rules, so any edit that can change an answer
(keywords, weights, label order, signals) gives a new identity and earlier cache entries miss.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
import re
from typing import Final

from worker.classification.classifiers.keyword_rules import (
    SIGNAL_NAMES,
    WORD_PATTERN,
    KeywordRules,
    LabelRule,
    SignalRule,
    fold,
    normalize_keyword,
    parse_keyword,
)
from worker.core.classification import Classification

__all__ = ["SIGNAL_NAMES", "KeywordClassifier", "KeywordRules", "LabelRule", "SignalRule"]

_NAME: Final = "keywords"
# Bump when the matching algorithm changes in a way the data file cannot express.
_ALGORITHM_VERSION: Final = "v1"
# The per-token memo is cleared when it grows past this, so odd traffic cannot grow it unbounded.
_TOKEN_MEMO_LIMIT: Final = 65_536

_TOKEN_RE: Final = re.compile(WORD_PATTERN)
_TLDS: Final = "ru|com|net|org|io|me|xyz|top|biz|info|link|click|site|online|shop|club|su|рф|ly"
# Starts with a literal so the regex engine can skip ahead fast; the rest is checked in Python.
_DOMAIN_END_RE: Final = re.compile(rf"\.(?:{_TLDS})\b")

# A phrase's words after the first: (word, is_stem).
_Tail = tuple[tuple[str, bool], ...]
# A keyword that starts at a token: (label index, rest of the phrase).
_Hit = tuple[int, _Tail]


def _has_url(folded: str) -> bool:
    """Tell whether folded text holds a link: http(s), www. or a bare domain, not an e-mail."""
    if "http" in folded or "www." in folded:
        return True
    for match in _DOMAIN_END_RE.finditer(folded):
        start = match.start()
        if start == 0 or not folded[start - 1].isalnum():
            continue
        word_start = max(folded.rfind(" ", 0, start), folded.rfind("\n", 0, start)) + 1
        if "@" not in folded[word_start:start]:
            return True
    return False


class KeywordClassifier:
    """Classifies chat messages by weighted keyword matches; see the module docstring."""

    def __init__(self, rules: KeywordRules, delay_s: float = 0.0) -> None:
        """Compile ``rules``; ``delay_s`` is a simulated latency per call, to mimic a slow model."""
        if not math.isfinite(delay_s) or delay_s < 0:
            raise ValueError(f"delay_s must be a finite number >= 0, got {delay_s!r}")
        self._rules = rules
        self._delay_s = delay_s
        self._labels = tuple(label.name for label in rules.labels)
        self._weights = tuple(label.weight for label in rules.labels)
        self._fallback_index = self._labels.index(rules.fallback)
        self._fallback_confidence = max(round(rules.fallback_confidence, 3), 0.001)
        digest = hashlib.sha256(rules.canonical_json().encode("utf-8")).hexdigest()
        self._identity = f"{_NAME}:{_ALGORITHM_VERSION}:{digest[:12]}"
        self._question_mark = _signal(rules, "question_mark", self._labels)
        self._url = _signal(rules, "url", self._labels)
        exact: dict[str, list[_Hit]] = {}
        stems: dict[str, list[_Hit]] = {}
        for index, label in enumerate(rules.labels):
            for keyword in label.keywords:
                (first, first_is_stem), *tail = parse_keyword(normalize_keyword(keyword))
                hit: _Hit = (index, tuple(tail))
                bucket = (stems if first_is_stem else exact).setdefault(first, [])
                if hit not in bucket:
                    bucket.append(hit)
        self._exact = {word: tuple(hits) for word, hits in exact.items()}
        self._stems = {stem: tuple(hits) for stem, hits in stems.items()}
        self._stem_lengths = tuple(sorted({len(stem) for stem in stems}))
        self._memo: dict[str, tuple[_Hit, ...]] = {}

    @classmethod
    def default(cls, delay_s: float = 0.0) -> KeywordClassifier:
        """Build the classifier from the rules shipped with the package."""
        return cls(KeywordRules.default(), delay_s=delay_s)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], delay_s: float = 0.0) -> KeywordClassifier:
        """Build the classifier from a JSON data file (format in the module docstring)."""
        return cls(KeywordRules.from_file(path), delay_s=delay_s)

    @property
    def name(self) -> str:
        """The classifier's short name, also put in every ``Classification``."""
        return _NAME

    @property
    def identity(self) -> str:
        """``keywords:v1:`` plus a hash of the rules; changes whenever an answer could."""
        return self._identity

    @property
    def labels(self) -> tuple[str, ...]:
        """The labels this classifier can answer, in tie-break order."""
        return self._labels

    @property
    def rules(self) -> KeywordRules:
        """The rules this classifier was compiled from."""
        return self._rules

    @property
    def immediate(self) -> bool:
        """True unless a latency is simulated: then every answer must await it."""
        return self._delay_s <= 0

    async def classify(self, text: str) -> Classification:
        """Classify ``text``, after sleeping ``delay_s`` when a latency is simulated."""
        if self._delay_s > 0:
            await asyncio.sleep(self._delay_s)
        return self.classify_sync(text)

    def classify_sync(self, text: str) -> Classification:
        """Classify ``text`` without awaiting: the CPU-only core of ``classify``."""
        folded = fold(text)
        tokens = _TOKEN_RE.findall(folded)
        scores = [0.0] * len(self._labels)
        weights = self._weights
        memo = self._memo
        for position, token in enumerate(tokens):
            hits = memo.get(token)
            if hits is None:
                hits = self._hits_starting_at(token)
            if not hits:
                continue
            counted = 0  # bit per label: a label scores at most once per starting word
            for label_index, tail in hits:
                if counted >> label_index & 1:
                    continue
                if tail and not _tail_matches(tokens, position + 1, tail):
                    continue
                counted |= 1 << label_index
                scores[label_index] += weights[label_index]
        if self._question_mark is not None and "?" in text:
            scores[self._question_mark[0]] += self._question_mark[1]
        if self._url is not None and _has_url(folded):
            scores[self._url[0]] += self._url[1]
        return self._decide(scores)

    def _decide(self, scores: list[float]) -> Classification:
        """Turn per-label scores into a classification (first listed label wins ties)."""
        best_index = max(range(len(scores)), key=scores.__getitem__)
        best = scores[best_index]
        if best <= 0 or best_index == self._fallback_index:
            return Classification(self._rules.fallback, self._fallback_confidence, _NAME)
        confidence = max(round(best / (sum(scores) + 1.0), 3), 0.001)
        return Classification(self._labels[best_index], confidence, _NAME)

    def _hits_starting_at(self, token: str) -> tuple[_Hit, ...]:
        """Return the keywords whose first word matches ``token``, memoizing the answer."""
        found: list[_Hit] = list(self._exact.get(token, ()))
        for length in self._stem_lengths:
            if length > len(token):
                break
            found.extend(self._stems.get(token[:length], ()))
        # Single words first: they always count, so phrases of an already counted label are skipped.
        hits = tuple(sorted(found, key=lambda hit: len(hit[1])))
        if len(self._memo) >= _TOKEN_MEMO_LIMIT:
            self._memo.clear()
        self._memo[token] = hits
        return hits

    async def aclose(self) -> None:
        """Release nothing: the classifier holds no connections."""


def _signal(rules: KeywordRules, name: str, labels: tuple[str, ...]) -> tuple[int, float] | None:
    """Return ``(label index, weight)`` of signal ``name``, or None when it is not configured."""
    for signal in rules.signals:
        if signal.name == name:
            return labels.index(signal.label), signal.weight
    return None


def _tail_matches(tokens: list[str], start: int, tail: _Tail) -> bool:
    """Tell whether the phrase words ``tail`` match ``tokens`` from ``start`` on."""
    if start + len(tail) > len(tokens):
        return False
    for offset, (word, is_stem) in enumerate(tail):
        token = tokens[start + offset]
        if not (token.startswith(word) if is_stem else token == word):
            return False
    return True
