"""The keyword classifier's rules: the data file format, its parsing and validation.

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

A rule set that loads is valid: ``KeywordRules`` checks everything on construction, and every
error is a ValueError naming the file and what is wrong.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Final

__all__ = [
    "SIGNAL_NAMES",
    "WORD_PATTERN",
    "KeywordRules",
    "LabelRule",
    "SignalRule",
    "fold",
    "normalize_keyword",
    "parse_keyword",
]

FORMAT_VERSION: Final = 1
_DEFAULT_FALLBACK_CONFIDENCE: Final = 0.3
_MIN_STEM_CHARS: Final = 2

SIGNAL_NAMES: Final = frozenset({"question_mark", "url"})

# A word of a message or of a keyword: letters and digits, apostrophes allowed inside.
WORD_PATTERN: Final = r"[^\W_]+(?:'[^\W_]+)*"
_KEYWORD_WORD_RE: Final = re.compile(rf"({WORD_PATTERN})(\*?)")

_TOP_LEVEL_KEYS: Final = frozenset(
    {"version", "description", "fallback", "fallback_confidence", "labels", "signals"}
)
_LABEL_KEYS: Final = frozenset({"weight", "keywords"})
_SIGNAL_KEYS: Final = frozenset({"label", "weight"})


def fold(text: str) -> str:
    """Return ``text`` in the form keywords are matched against."""
    folded = text.casefold()
    # ``in`` then ``replace`` is an order of magnitude faster than ``str.translate`` here.
    if "ё" in folded:
        folded = folded.replace("ё", "е")
    if "’" in folded:
        folded = folded.replace("’", "'")
    return folded


def normalize_keyword(keyword: str) -> str:
    """Return ``keyword`` folded like message text, with its words separated by single spaces."""
    return " ".join(fold(keyword).split())


def parse_keyword(keyword: str) -> tuple[tuple[str, bool], ...]:
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
            normalized = normalize_keyword(keyword)
            if not normalized:
                raise ValueError(f"label {self.name!r}: empty keyword")
            parse_keyword(normalized)


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
        if version != FORMAT_VERSION or isinstance(version, bool):
            raise ValueError(f"unsupported version {version!r} (expected {FORMAT_VERSION})")
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
            "version": FORMAT_VERSION,
            "fallback": self.fallback,
            "fallback_confidence": self.fallback_confidence,
            "labels": [
                [
                    label.name,
                    label.weight,
                    sorted({normalize_keyword(keyword) for keyword in label.keywords}),
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
