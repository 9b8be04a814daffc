"""Parsing hostile bodies: every malformed kind gets its reason, and no body makes parsing fail in
any other way or yields a message that could not be published."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import HealthCheck, given, settings

from tests.integration.support import HOSTILE, HOSTILE_MAX_BYTES, Hostile, random_bodies
from worker.core.errors import InvalidMessage
from worker.core.models import MAX_ID_CHARS, REASONS, parse_message


def test_the_catalogue_has_twenty_distinct_kinds_and_every_reason() -> None:
    """More than twenty distinct malformed kinds, covering every reason the parser can give."""
    assert len({case.name for case in HOSTILE}) == len(HOSTILE) >= 20
    assert len({case.body for case in HOSTILE}) == len(HOSTILE)
    assert {case.reason for case in HOSTILE} == REASONS - {"no_message_id"}


@pytest.mark.parametrize("case", HOSTILE, ids=[case.name for case in HOSTILE])
def test_each_hostile_kind_is_rejected_with_its_reason(case: Hostile) -> None:
    """The parser rejects the body with the expected reason code and a detail saying why."""
    with pytest.raises(InvalidMessage) as caught:
        parse_message(case.body, case.amqp_message_id or "amqp-id", HOSTILE_MAX_BYTES)
    assert caught.value.reason == case.reason
    assert caught.value.detail


def test_no_id_anywhere_is_its_own_reason() -> None:
    """A body without message_id, delivered without the AMQP property, is ``no_message_id``."""
    with pytest.raises(InvalidMessage) as caught:
        parse_message(b'{"text": "who am I"}', None, HOSTILE_MAX_BYTES)
    assert caught.value.reason == "no_message_id"


def test_nesting_within_the_limit_and_innocent_lookalikes_pass() -> None:
    """Moderate nesting, brackets and key names inside the text, and ASCII escapes in other
    keys are all fine: only real repeats of message_id/text and real depth are refused."""
    body = orjson.dumps(
        {
            "message_id": "ok-1",
            "text": 'she wrote "text" and "message_id" [[[{{{',
            "metadata": {"a": [[{"b": [1, 2, 3]}]] * 30},
        }
    )
    assert parse_message(body, None, HOSTILE_MAX_BYTES).message_id == "ok-1"
    escaped = b'{"message_id": "ok-2", "text": "caf\\u00e9 \\u0041", "\\u0063hat": 1}'
    assert parse_message(escaped, None, HOSTILE_MAX_BYTES).text == "café A"


@settings(
    max_examples=600,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
@given(random_bodies())
def test_random_bodies_are_either_valid_and_publishable_or_rejected_with_a_reason(
    body: bytes,
) -> None:
    """Whatever the bytes, parsing either returns a message whose result can be encoded, or raises
    ``InvalidMessage`` with a known reason; nothing else ever escapes."""
    for amqp_id in (None, "amqp-id"):
        try:
            message = parse_message(body, amqp_id, HOSTILE_MAX_BYTES)
        except InvalidMessage as exc:
            rejected = exc
        else:
            rejected = None
        if rejected is not None:
            assert rejected.reason in REASONS
            assert rejected.detail
            continue
        assert isinstance(message.message_id, str)
        assert 0 < len(message.message_id) <= MAX_ID_CHARS
        assert message.message_id.isprintable()
        assert message.text.strip()
        assert message.body["message_id"] == message.message_id
        result = {**message.body, "classification": {"label": "other", "confidence": 0.5}}
        assert orjson.loads(orjson.dumps(result))["message_id"] == message.message_id
