"""Unit tests for generated sample traffic."""

from __future__ import annotations

import math
import re
import uuid
from datetime import UTC, datetime

import pytest

from worker.cli.samples import (
    SampleMessage,
    SamplePlan,
    generate_sample,
    labelled_sample_texts,
    sample_texts,
)


def first_by_id(plan: SamplePlan) -> dict[str, SampleMessage]:
    """Map each message id of ``plan`` to the first message sent with it."""
    first: dict[str, SampleMessage] = {}
    for message in plan.messages:
        first.setdefault(message.message_id, message)
    return first


def test_sample_pool_has_300_distinct_russian_and_english_texts() -> None:
    """The pool holds at least 300 texts, distinct after whitespace and case folding, in both languages."""
    texts = sample_texts()
    folded = {" ".join(text.split()).casefold() for text in texts}
    assert len(texts) >= 300
    assert len(folded) == len(texts)
    assert sum(bool(re.search("[а-яё]", t, re.IGNORECASE)) for t in texts) >= 100
    assert sum(not re.search("[а-яё]", t, re.IGNORECASE) for t in texts) >= 100


def test_sample_pool_spreads_across_all_labels() -> None:
    """Every label of the default classifier has sample texts."""
    labels = {sample.label for sample in labelled_sample_texts()}
    assert labels == {"question", "complaint", "order", "greeting", "spam", "other"}


def test_no_pool_text_looks_like_a_uniqueness_suffix() -> None:
    """No pool text ends in `` #N``, so suffixed texts can never collide with pool texts."""
    assert not [text for text in sample_texts() if re.search(r" #\d+$", text)]


@pytest.mark.parametrize(
    ("count", "duplicates", "repeated_texts"),
    [(0, 0.0, 0.0), (1, 0.0, 1.0), (10, 0.3, 0.5), (1000, 0.1, 0.3), (5000, 0.5, 0.0)],
)
def test_plan_counts_are_exact(count: int, duplicates: float, repeated_texts: float) -> None:
    """The plan has ``count`` messages with exactly the announced duplicates, ids and texts."""
    plan = generate_sample(count, duplicates, repeated_texts, seed=42)
    duplicate_count = round(count * duplicates)
    unique_ids = count - duplicate_count
    uniques = list(first_by_id(plan).values())
    assert len(plan.messages) == count
    assert plan.duplicate_count == duplicate_count
    assert plan.unique_ids == unique_ids == len(uniques)
    assert plan.distinct_texts == len({message.text for message in uniques})
    repeated = min(round(unique_ids * repeated_texts), max(unique_ids - 1, 0))
    assert plan.distinct_texts == unique_ids - repeated


def test_duplicates_are_exact_copies_of_earlier_messages() -> None:
    """Each re-sent id is an exact copy of its earlier original, some back to back and some later."""
    plan = generate_sample(2000, 0.2, 0.1, seed=7)
    seen: dict[str, int] = {}
    back_to_back = later = 0
    for position, message in enumerate(plan.messages):
        if message.message_id not in seen:
            seen[message.message_id] = position
            continue
        assert message == plan.messages[seen[message.message_id]]
        if plan.messages[position - 1].message_id == message.message_id:
            back_to_back += 1
        else:
            later += 1
    assert back_to_back + later == plan.duplicate_count
    assert back_to_back > 0
    assert later > 0


def test_repeated_texts_copy_earlier_unique_messages() -> None:
    """Unique messages either carry a new text or repeat one an earlier unique message carried."""
    plan = generate_sample(3000, 0.0, 0.4, seed=3)
    seen_texts: set[str] = set()
    repeats = 0
    for message in plan.messages:
        repeats += message.text in seen_texts
        seen_texts.add(message.text)
    assert repeats == round(3000 * 0.4)
    assert len(seen_texts) == plan.distinct_texts


def test_texts_stay_distinct_beyond_the_pool() -> None:
    """When more distinct texts are needed than the pool holds, suffixes keep them distinct."""
    count = len(sample_texts()) * 3 + 17
    plan = generate_sample(count, 0.0, 0.0, seed=1)
    texts = [message.text for message in plan.messages]
    assert len({" ".join(t.split()).casefold() for t in texts}) == count
    assert any(re.search(r" #\d+$", text) for text in texts)


def test_all_texts_repeated_keeps_one_distinct_text() -> None:
    """``repeated_texts=1`` makes every unique message after the first reuse its text."""
    plan = generate_sample(50, 0.0, 1.0, seed=5)
    assert plan.distinct_texts == 1
    assert len({message.text for message in plan.messages}) == 1


def test_plan_is_reproducible_by_seed() -> None:
    """The same seed gives the same plan; another seed gives another one."""
    assert generate_sample(500, 0.2, 0.3, seed=11) == generate_sample(500, 0.2, 0.3, seed=11)
    assert generate_sample(500, 0.2, 0.3, seed=11) != generate_sample(500, 0.2, 0.3, seed=12)


def test_unseeded_plans_differ() -> None:
    """Without a seed, two plans get different message ids."""
    first = generate_sample(5, 0.0, 0.0).messages[0].message_id
    assert first != generate_sample(5, 0.0, 0.0).messages[0].message_id


def test_message_ids_are_uuid4_strings() -> None:
    """Message ids are canonical version-4 UUID strings."""
    for message in generate_sample(200, 0.0, 0.0, seed=9).messages:
        parsed = uuid.UUID(message.message_id)
        assert parsed.version == 4
        assert str(parsed) == message.message_id


def test_to_body_carries_the_fields_and_a_utc_timestamp() -> None:
    """``to_body`` returns the message fields and an ISO-8601 UTC ``received_at``."""
    message = SampleMessage(message_id="m-1", text="привет", chat_id="chat-0001", source="web")
    body = message.to_body()
    assert set(body) == {"message_id", "text", "chat_id", "source", "received_at"}
    assert (body["message_id"], body["text"], body["chat_id"], body["source"]) == (
        "m-1",
        "привет",
        "chat-0001",
        "web",
    )
    received_at = body["received_at"]
    assert isinstance(received_at, str)
    assert datetime.fromisoformat(received_at).utcoffset() == UTC.utcoffset(None)
    fixed = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    assert message.to_body(received_at=fixed)["received_at"] == "2024-05-01T12:00:00+00:00"


@pytest.mark.parametrize(
    ("count", "duplicates", "repeated_texts", "problem"),
    [
        (-1, 0.0, 0.0, "count"),
        (1.5, 0.0, 0.0, "count"),
        (True, 0.0, 0.0, "count"),
        (10, -0.1, 0.0, "duplicates"),
        (10, 1.5, 0.0, "duplicates"),
        (10, math.nan, 0.0, "duplicates"),
        (10, 0.0, 2.0, "repeated_texts"),
        (10, 0.0, -0.5, "repeated_texts"),
        (10, 1.0, 0.0, "no original"),
    ],
)
def test_invalid_arguments_raise_value_error(
    count: int, duplicates: float, repeated_texts: float, problem: str
) -> None:
    """Out-of-range counts or fractions raise ValueError naming the offending argument."""
    with pytest.raises(ValueError, match=problem):
        generate_sample(count, duplicates, repeated_texts, seed=1)
