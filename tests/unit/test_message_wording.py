"""The reasons given for a rejected message read as sentences a producer can act on."""

from __future__ import annotations

import pytest

from worker.core.errors import InvalidMessage
from worker.core.models import parse_message


@pytest.mark.parametrize(
    ("raw", "detail"),
    [
        (b'{"message_id": 17, "text": "x"}', "message_id must be a string, got int"),
        (b'{"message_id": ["a"], "text": "x"}', "message_id must be a string, got list"),
        (b'{"message_id": "1", "text": 12}', "text must be a string, got int"),
    ],
)
def test_a_field_of_the_wrong_type_is_named_with_the_type_expected_and_the_type_got(
    raw: bytes, detail: str
) -> None:
    """A non-string ``message_id`` or ``text`` is rejected with "must be a string, got <type>"."""
    with pytest.raises(InvalidMessage) as caught:
        parse_message(raw, None, 1000)
    assert caught.value.detail == detail
