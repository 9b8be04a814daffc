"""Generated chat traffic for ``neiromatrius-worker publish --sample N`` and the demo.

Texts come from ``worker/cli/data/sample_texts.json``::

    {"version": 1,
     "groups": [{"label": "question",
                 "templates": ["Do you ship to {city}?", "..."],
                 "fillers": {"city": ["Berlin", "Riga"]}}]}

Every template of a group is expanded with every combination of the fillers it names, giving a
few hundred distinct Russian and English messages; ``label`` is what a good classifier should say.

``generate_sample`` turns that pool into a publish plan with a known amount of redelivery (the same
``message_id`` sent again, which deduplication must absorb) and of repeated texts (new messages whose
text was already seen, which the classification cache must serve), so a run can check its counters
against the plan exactly.
"""

from __future__ import annotations

import functools
import itertools
import json
import random
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from typing import Final

__all__ = [
    "LabelledText",
    "SampleMessage",
    "SamplePlan",
    "generate_sample",
    "labelled_sample_texts",
    "sample_texts",
]

_RESOURCE_NAME: Final = "worker/cli/data/sample_texts.json"
_PLACEHOLDER_RE: Final = re.compile(r"\{(\w+)\}")
# Texts made distinct beyond the pool get this suffix, so pool texts must not already end like it.
_SUFFIX_RE: Final = re.compile(r" #\d+$")
_SOURCES: Final = ("telegram", "whatsapp", "web", "vk")
_CHAT_COUNT: Final = 200
# Share of duplicates sent right after their original; the rest arrive later in the stream.
_BACK_TO_BACK_SHARE: Final = 0.5


@dataclass(frozen=True, slots=True)
class LabelledText:
    """A sample text with the label a good classifier should give it."""

    text: str
    label: str


@dataclass(frozen=True, slots=True)
class SampleMessage:
    """One chat message to publish."""

    message_id: str
    text: str
    chat_id: str
    source: str

    def to_body(self, received_at: datetime | None = None) -> dict[str, object]:
        """Return the JSON body to publish, stamped ``received_at`` (default: now) in UTC."""
        stamp = (received_at or datetime.now(UTC)).astimezone(UTC)
        return {
            "message_id": self.message_id,
            "text": self.text,
            "chat_id": self.chat_id,
            "source": self.source,
            "received_at": stamp.isoformat(),
        }


@dataclass(frozen=True, slots=True)
class SamplePlan:
    """What to publish, in order, and the counts a correct run must report for it."""

    messages: list[SampleMessage]
    unique_ids: int
    duplicate_count: int
    distinct_texts: int


def sample_texts() -> list[str]:
    """Return the pool of distinct sample texts (distinct even after case and space folding)."""
    return [sample.text for sample in _load_pool()]


def labelled_sample_texts() -> list[LabelledText]:
    """Return the pool of sample texts with their expected labels."""
    return list(_load_pool())


@functools.cache
def _load_pool() -> tuple[LabelledText, ...]:
    """Load and expand the shipped sample file once."""
    resource = resources.files("worker.cli") / "data" / "sample_texts.json"
    try:
        return _expand(json.loads(resource.read_bytes()))
    except ValueError as exc:
        raise ValueError(f"{_RESOURCE_NAME}: {exc}") from exc


def _expand(document: object) -> tuple[LabelledText, ...]:
    """Expand the groups of a sample document, dropping texts that fold to an earlier one."""
    if not isinstance(document, dict) or not isinstance(document.get("groups"), list):
        raise ValueError("expected an object with a 'groups' list")
    seen: set[str] = set()
    pool: list[LabelledText] = []
    for group in document["groups"]:
        label, templates, fillers = _parse_group(group)
        for template in templates:
            names = list(dict.fromkeys(_PLACEHOLDER_RE.findall(template)))
            missing = sorted(set(names) - set(fillers))
            if missing:
                raise ValueError(f"template {template!r} names unknown fillers {missing}")
            for values in itertools.product(*(fillers[name] for name in names)):
                filled = template.format_map(dict(zip(names, values, strict=True)))
                text = " ".join(filled.split())
                if _SUFFIX_RE.search(text):
                    raise ValueError(f"text {text!r} ends like a uniqueness suffix ' #N'")
                key = text.casefold()
                if text and key not in seen:
                    seen.add(key)
                    pool.append(LabelledText(text=text, label=label))
    if not pool:
        raise ValueError("no sample texts")
    return tuple(pool)


def _parse_group(group: object) -> tuple[str, list[str], dict[str, list[str]]]:
    """Check one group's structure and return its label, templates and fillers."""
    if not isinstance(group, dict):
        raise ValueError("each group must be an object")
    label = group.get("label")
    templates = group.get("templates")
    fillers = group.get("fillers", {})
    if not isinstance(label, str):
        raise ValueError("each group needs a string 'label'")
    if not isinstance(templates, list) or not all(isinstance(t, str) for t in templates):
        raise ValueError(f"group {label!r}: 'templates' must be a list of strings")
    if not isinstance(fillers, dict) or not all(
        isinstance(values, list) and all(isinstance(v, str) for v in values)
        for values in fillers.values()
    ):
        raise ValueError(f"group {label!r}: 'fillers' must map names to lists of strings")
    return label, templates, fillers


def generate_sample(
    count: int, duplicates: float, repeated_texts: float, seed: int | None = None
) -> SamplePlan:
    """Plan ``count`` messages to publish, exactly reproducible when ``seed`` is given.

    ``duplicates`` is the fraction of the ``count`` messages that re-send an earlier message
    (same id, same text): ``duplicate_count == round(count * duplicates)``. About half are sent
    right after their original, the rest later. ``repeated_texts`` is the fraction of the unique
    messages whose text copies an earlier unique message's text (cache hits); the first unique
    message always carries a new text. Other unique messages get distinct texts, made distinct
    with a `` #N`` suffix once the pool runs out. Raises ValueError on out-of-range arguments.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"count must be an integer >= 0, got {count!r}")
    _check_fraction("duplicates", duplicates)
    _check_fraction("repeated_texts", repeated_texts)
    duplicate_count = round(count * duplicates)
    unique_ids = count - duplicate_count
    if count > 0 and unique_ids == 0:
        raise ValueError(
            f"duplicates={duplicates} makes all {count} messages duplicates, "
            "leaving no original to duplicate"
        )
    rng = random.Random(seed)
    repeated_count = min(round(unique_ids * repeated_texts), max(unique_ids - 1, 0))
    distinct_count = unique_ids - repeated_count
    uniques = _unique_messages(rng, unique_ids, distinct_count, repeated_count)
    return SamplePlan(
        messages=_with_duplicates(rng, uniques, duplicate_count),
        unique_ids=unique_ids,
        duplicate_count=duplicate_count,
        distinct_texts=distinct_count,
    )


def _check_fraction(name: str, value: float) -> None:
    """Raise ValueError unless ``value`` is a number in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        # NaN fails the range check too.
        raise ValueError(f"{name} must be a fraction in [0, 1], got {value!r}")


def _unique_messages(
    rng: random.Random, unique_ids: int, distinct_count: int, repeated_count: int
) -> list[SampleMessage]:
    """Build the unique messages, ``repeated_count`` of them reusing an earlier text."""
    pool = sample_texts()
    rng.shuffle(pool)
    texts = iter(_distinct_texts(pool, distinct_count))
    repeats = set(rng.sample(range(1, unique_ids), repeated_count)) if repeated_count else set()
    messages: list[SampleMessage] = []
    for index in range(unique_ids):
        text = messages[rng.randrange(index)].text if index in repeats else next(texts)
        chat = rng.randrange(_CHAT_COUNT)
        messages.append(
            SampleMessage(
                message_id=_uuid4(rng),
                text=text,
                chat_id=f"chat-{chat:04d}",
                source=_SOURCES[chat % len(_SOURCES)],
            )
        )
    return messages


def _distinct_texts(pool: list[str], needed: int) -> list[str]:
    """Return ``needed`` distinct texts: the pool, then pool texts with a `` #N`` suffix."""
    size = len(pool)
    return [
        pool[index] if index < size else f"{pool[index % size]} #{index // size}"
        for index in range(needed)
    ]


def _with_duplicates(
    rng: random.Random, uniques: list[SampleMessage], duplicate_count: int
) -> list[SampleMessage]:
    """Interleave ``duplicate_count`` copies of earlier messages into the unique ones."""
    last = len(uniques) - 1
    # Copies to send after the unique message at each index; back-to-back copies go first.
    after: dict[int, list[SampleMessage]] = {}
    for _ in range(duplicate_count):
        original = rng.randrange(len(uniques))
        if original == last or rng.random() < _BACK_TO_BACK_SHARE:
            after.setdefault(original, []).insert(0, uniques[original])
        else:
            after.setdefault(rng.randrange(original + 1, last + 1), []).append(uniques[original])
    messages: list[SampleMessage] = []
    for index, message in enumerate(uniques):
        messages.append(message)
        copies = after.get(index)
        if copies:
            messages.extend(copies)
    return messages


def _uuid4(rng: random.Random) -> str:
    """Return a version-4 UUID string drawn from ``rng`` (so a seed reproduces it)."""
    bits = rng.getrandbits(128)
    bits = (bits & ~(0xC000 << 48)) | (0x8000 << 48)  # RFC 4122 variant
    bits = (bits & ~(0xF000 << 64)) | (4 << 76)  # version 4
    hex_digits = f"{bits:032x}"
    return (
        f"{hex_digits[:8]}-{hex_digits[8:12]}-{hex_digits[12:16]}-"
        f"{hex_digits[16:20]}-{hex_digits[20:]}"
    )
