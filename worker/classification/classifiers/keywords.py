"""The keyword classifier: embedded, offline and fast, for Russian and English chat messages.

Labels, keywords and weights live in a JSON data file; the shipped default is
``worker/classification/classifiers/data/keywords.json``. Its format::

    {
      "version": 1,                       # format version, must be 1
      "fallback": "other",                # label given when nothing matches; must be in "labels"
      "fallback_confidence": 0.3,         # optional, in (0, 1], default 0.3
      "labels": {                         # order matters: it breaks ties
        "question": {"weight": 1.0, "keywords": ["почему", "как*", "how", "can you"]},
        "other": {}                       # "weight" defaults to 1.0, "keywords" to []
      },
      "signals": {                        # optional cheap signals, each adds weight to a label
        "question_mark": {"label": "question", "weight": 1.0},
        "url": {"label": "spam", "weight": 1.5}
      }
    }

A keyword is one word or a phrase of several. A word ending in ``*`` is a stem and matches any word
that starts with it, which is how Russian inflection is handled (``заказ*`` matches заказ, заказа,
заказать, заказы); a word without ``*`` matches only itself (``hi`` must not match ``his``). A phrase
matches consecutive words, each word by its own rule (``не работ*`` matches "не работает").

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
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Final

from worker.classification.classifiers.base import Classification

__all__ = ["SIGNAL_NAMES", "KeywordClassifier", "KeywordRules", "LabelRule", "SignalRule"]

_NAME: Final = "keywords"
# Bump when the matching algorithm changes in a way the data file cannot express.
_ALGORITHM_VERSION: Final = "v1"
_FORMAT_VERSION: Final = 1
_DEFAULT_FALLBACK_CONFIDENCE: Final = 0.3
_MIN_STEM_CHARS: Final = 2
# The per-token memo is cleared when it grows past this, so odd traffic cannot grow it unbounded.
_TOKEN_MEMO_LIMIT: Final = 65_536

SIGNAL_NAMES: Final = frozenset({"question_mark", "url"})

_WORD: Final = r"[^\W_]+(?:'[^\W_]+)*"
_TOKEN_RE: Final = re.compile(_WORD)
_KEYWORD_WORD_RE: Final = re.compile(rf"({_WORD})(\*?)")
_TLDS: Final = "ru|com|net|org|io|me|xyz|top|biz|info|link|click|site|online|shop|club|su|рф|ly"
# Starts with a literal so the regex engine can skip ahead fast; the rest is checked in Python.
_DOMAIN_END_RE: Final = re.compile(rf"\.(?:{_TLDS})\b")

_TOP_LEVEL_KEYS: Final = frozenset(
    {"version", "description", "fallback", "fallback_confidence", "labels", "signals"}
)
_LABEL_KEYS: Final = frozenset({"weight", "keywords"})
_SIGNAL_KEYS: Final = frozenset({"label", "weight"})

# A phrase's words after the first: (word, is_stem).
_Tail = tuple[tuple[str, bool], ...]
# A keyword that starts at a token: (label index, rest of the phrase).
_Hit = tuple[int, _Tail]


def _fold(text: str) -> str:
    """Return ``text`` in the form keywords are matched against."""
    folded = text.casefold()
    # ``in`` then ``replace`` is an order of magnitude faster than ``str.translate`` here.
    if "ё" in folded:
        folded = folded.replace("ё", "е")
    if "’" in folded:
        folded = folded.replace("’", "'")
    return folded


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


def _normalize_keyword(keyword: str) -> str:
    """Return ``keyword`` folded like message text, with its words separated by single spaces."""
    return " ".join(_fold(keyword).split())


def _parse_keyword(keyword: str) -> tuple[tuple[str, bool], ...]:
    """Split a normalized keyword into ``(word, is_stem)`` pairs, raising ValueError if invalid."""
    words = keyword.split(" ")
    parsed: list[tuple[str, bool]] = []
    for word in words:
        match = _KEYWORD_WORD_RE.fullmatch(word)
        if match is None:
            raise ValueError(
                f"keyword {keyword!r}: {word!r} is not a word of letters/digits with an optional "
                "trailing '*', so it could never match"
            )
        is_stem = match.group(2) == "*"
        if is_stem and len(match.group(1)) < _MIN_STEM_CHARS:
            raise ValueError(
                f"keyword {keyword!r}: stem {word!r} is shorter than {_MIN_STEM_CHARS} characters"
            )
        parsed.append((match.group(1), is_stem))
    return tuple(parsed)


def _check_weight(weight: float, what: str) -> None:
    """Raise ValueError unless ``weight`` is a finite positive number."""
    if not math.isfinite(weight) or weight <= 0:
        raise ValueError(f"{what}: weight must be a finite number > 0, got {weight!r}")


@dataclass(frozen=True, slots=True)
class LabelRule:
    """One label with the weight each of its keyword matches adds and its keywords."""

    name: str
    weight: float
    keywords: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("label names must be non-empty")
        _check_weight(self.weight, f"label {self.name!r}")
        for keyword in self.keywords:
            normalized = _normalize_keyword(keyword)
            if not normalized:
                raise ValueError(f"label {self.name!r}: empty keyword")
            _parse_keyword(normalized)


@dataclass(frozen=True, slots=True)
class SignalRule:
    """A cheap non-keyword signal (see ``SIGNAL_NAMES``) that adds ``weight`` to ``label``."""

    name: str
    label: str
    weight: float

    def __post_init__(self) -> None:
        if self.name not in SIGNAL_NAMES:
            raise ValueError(f"unknown signal {self.name!r}; known signals: {sorted(SIGNAL_NAMES)}")
        _check_weight(self.weight, f"signal {self.name!r}")


@dataclass(frozen=True, slots=True)
class KeywordRules:
    """Everything that decides the keyword classifier's answers; validated on construction."""

    labels: tuple[LabelRule, ...]
    fallback: str
    fallback_confidence: float = _DEFAULT_FALLBACK_CONFIDENCE
    signals: tuple[SignalRule, ...] = ()

    def __post_init__(self) -> None:
        names = [label.name for label in self.labels]
        if not names:
            raise ValueError("the label set is empty")
        if len(set(names)) != len(names):
            raise ValueError(f"label names repeat: {names}")
        if self.fallback not in names:
            raise ValueError(f"fallback label {self.fallback!r} is not among the labels {names}")
        if not 0 < self.fallback_confidence <= 1:
            raise ValueError(
                f"fallback_confidence must be in (0, 1], got {self.fallback_confidence!r}"
            )
        for signal in self.signals:
            if signal.label not in names:
                raise ValueError(
                    f"signal {signal.name!r} names unknown label {signal.label!r}; "
                    f"labels are {names}"
                )
        if len({signal.name for signal in self.signals}) != len(self.signals):
            raise ValueError("a signal is configured twice")

    @classmethod
    def default(cls) -> KeywordRules:
        """Load the rules shipped with the package."""
        resource = resources.files("worker.classification.classifiers") / "data" / "keywords.json"
        return cls.from_json(
            resource.read_bytes(), source="worker.classification.classifiers/data/keywords.json"
        )

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> KeywordRules:
        """Load rules from a JSON data file; ValueError names the file and what is wrong."""
        with open(path, "rb") as data_file:
            return cls.from_json(data_file.read(), source=os.fspath(path))

    @classmethod
    def from_json(cls, document: str | bytes, source: str) -> KeywordRules:
        """Parse a JSON document; ``source`` names it in error messages."""
        try:
            data = json.loads(document)
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
            raise ValueError(f"{source}: not valid UTF-8 JSON: {exc}") from exc
        try:
            return cls.from_mapping(data)
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from exc

    @classmethod
    def from_mapping(cls, data: object) -> KeywordRules:
        """Build rules from already-decoded JSON, checking its structure."""
        if not isinstance(data, dict):
            raise ValueError("the top level must be a JSON object")
        _reject_unknown_keys(data, _TOP_LEVEL_KEYS, "top level")
        version = data.get("version")
        if version != _FORMAT_VERSION or isinstance(version, bool):
            raise ValueError(f"unsupported version {version!r} (expected {_FORMAT_VERSION})")
        fallback = data.get("fallback")
        if not isinstance(fallback, str):
            raise ValueError("'fallback' must be a string naming the fallback label")
        raw_labels = data.get("labels")
        if not isinstance(raw_labels, dict):
            raise ValueError("'labels' must be an object mapping label names to their rules")
        raw_signals = data.get("signals", {})
        if not isinstance(raw_signals, dict):
            raise ValueError("'signals' must be an object mapping signal names to their rules")
        return cls(
            labels=tuple(_label_from_json(name, spec) for name, spec in raw_labels.items()),
            fallback=fallback,
            fallback_confidence=_number(
                data.get("fallback_confidence", _DEFAULT_FALLBACK_CONFIDENCE),
                "'fallback_confidence'",
            ),
            signals=tuple(_signal_from_json(name, spec) for name, spec in raw_signals.items()),
        )

    def canonical_json(self) -> str:
        """Return the rules as canonical JSON: equal answers-wise rules give equal text."""
        canonical = {
            "version": _FORMAT_VERSION,
            "fallback": self.fallback,
            "fallback_confidence": self.fallback_confidence,
            "labels": [
                [
                    label.name,
                    label.weight,
                    sorted({_normalize_keyword(keyword) for keyword in label.keywords}),
                ]
                for label in self.labels
            ],
            "signals": sorted([s.name, s.label, s.weight] for s in self.signals),
        }
        return json.dumps(canonical, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def _reject_unknown_keys(data: Mapping[str, object], allowed: frozenset[str], where: str) -> None:
    """Raise ValueError naming any key of ``data`` not in ``allowed`` (catches typos)."""
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; allowed keys are {sorted(allowed)}")


def _number(value: object, what: str) -> float:
    """Return ``value`` as a float, raising ValueError unless it is a JSON number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{what} must be a number, got {value!r}")
    return float(value)


def _label_from_json(name: str, spec: object) -> LabelRule:
    """Build one label's rule from its JSON object."""
    if not isinstance(spec, dict):
        raise ValueError(f"label {name!r}: its rule must be an object")
    _reject_unknown_keys(spec, _LABEL_KEYS, f"label {name!r}")
    keywords = spec.get("keywords", [])
    if not isinstance(keywords, list) or not all(isinstance(k, str) for k in keywords):
        raise ValueError(f"label {name!r}: 'keywords' must be a list of strings")
    return LabelRule(
        name=name,
        weight=_number(spec.get("weight", 1.0), f"label {name!r}: 'weight'"),
        keywords=tuple(keywords),
    )


def _signal_from_json(name: str, spec: object) -> SignalRule:
    """Build one signal's rule from its JSON object."""
    if not isinstance(spec, dict):
        raise ValueError(f"signal {name!r}: its rule must be an object")
    _reject_unknown_keys(spec, _SIGNAL_KEYS, f"signal {name!r}")
    label = spec.get("label")
    if not isinstance(label, str):
        raise ValueError(f"signal {name!r}: 'label' must be a string")
    return SignalRule(
        name=name,
        label=label,
        weight=_number(spec.get("weight", 1.0), f"signal {name!r}: 'weight'"),
    )


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
                (first, first_is_stem), *tail = _parse_keyword(_normalize_keyword(keyword))
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
        folded = _fold(text)
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
