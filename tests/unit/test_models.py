"""Message parsing: what is accepted, what is rejected and with which reason."""

from __future__ import annotations

import pytest

from worker.core.errors import InvalidMessage
from worker.core.models import parse_message


def test_valid_message_keeps_every_field() -> None:
    """Extra fields pass through untouched."""
    m = parse_message(b'{"message_id":"1","text":"hi","chat_id":7,"metadata":{"a":1}}', None, 1000)
    assert (m.message_id, m.text) == ("1", "hi")
    assert m.body["chat_id"] == 7
    assert m.body["metadata"] == {"a": 1}


def test_amqp_message_id_is_used_when_the_body_has_none() -> None:
    """Without ``message_id`` in the body, the AMQP property supplies it (and is added to it)."""
    m = parse_message(b'{"text":"hi"}', "amqp-7", 1000)
    assert m.message_id == "amqp-7"
    assert m.body["message_id"] == "amqp-7"


@pytest.mark.parametrize(
    ("raw", "amqp_id", "reason"),
    [
        (b"nope", None, "not_json"),
        (b"[1,2]", None, "not_object"),
        (b'{"text":"x"}', None, "no_message_id"),
        (b'{"message_id":"1"}', None, "no_text"),
        (b'{"message_id":"1","text":null}', None, "no_text"),
        (b'{"message_id":"1","text":["x"]}', None, "bad_text"),
        (b'{"message_id":"1","text":" \\n\\t "}', None, "empty_text"),
        (b'{"message_id":"","text":"x"}', None, "bad_message_id"),
        (b'{"message_id":"a\\u0000b","text":"x"}', None, "bad_message_id"),
        (b'{"message_id":"1","text":"' + b"x" * 200 + b'"}', None, "too_large"),
    ],
)
def test_invalid_messages_have_a_reason(raw: bytes, amqp_id: str | None, reason: str) -> None:
    """Each kind of bad body is rejected with its own reason code."""
    with pytest.raises(InvalidMessage) as raised:
        parse_message(raw, amqp_id, 100)
    assert raised.value.reason == reason
