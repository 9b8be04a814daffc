"""The frames the direct publisher packs by hand are, byte for byte, the ones pamqp marshals."""

from __future__ import annotations

import pamqp.frame
import pytest
from aiormq.exceptions import ChannelInvalidStateError, ChannelNotFoundEntity
from pamqp.body import ContentBody
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from worker.amqp.broker import PUBLISH_ERRORS
from worker.amqp.fastpath.publishing import body_frames, content_header


def pamqp_header(channel: int, size: int, message_id: str, app_id: str | None) -> bytes:
    properties = Basic.Properties(
        message_id=message_id, content_type="application/json", delivery_mode=2, app_id=app_id
    )
    return pamqp.frame.marshal(ContentHeader(0, size, properties), channel)


@pytest.mark.parametrize(
    ("channel", "size", "message_id", "app_id"),
    [
        (1, 0, "m-1", None),
        (2, 200, "0d9a8f4e-3c3b-4d7a-9a1f-1234567890ab", "replica-abc123"),
        (65535, 2**40, "сообщение-№1", "реплика"),
        (7, 131072, "x" * 255, "y" * 255),
    ],
)
def test_content_header_matches_pamqp(
    channel: int, size: int, message_id: str, app_id: str | None
) -> None:
    assert content_header(channel, size, message_id, app_id) == pamqp_header(
        channel, size, message_id, app_id
    )


def test_an_id_longer_than_a_short_string_is_refused() -> None:
    with pytest.raises(ValueError, match="255 bytes"):
        content_header(1, 10, "я" * 128, None)  # 256 bytes in UTF-8


@pytest.mark.parametrize("size", [0, 1, 99, 100, 101, 250])
def test_body_frames_match_pamqp_split_at_the_frame_limit(size: int) -> None:
    body = bytes(range(256))[:size]
    expected = b"".join(
        pamqp.frame.marshal(ContentBody(body[i : i + 100]), 3) for i in range(0, size, 100)
    )
    assert body_frames(3, body, 100) == expected


def test_a_bug_is_not_a_publish_error_but_a_closed_channel_is() -> None:
    """A ``RuntimeError`` from a bug propagates instead of becoming a retry; aiormq's closed-channel
    error (itself a ``RuntimeError``) and the broker's AMQP errors are retried."""
    assert not isinstance(RuntimeError("a bug"), PUBLISH_ERRORS)
    assert isinstance(ChannelInvalidStateError("closed"), PUBLISH_ERRORS)
    assert isinstance(ChannelNotFoundEntity("no exchange"), PUBLISH_ERRORS)
    assert isinstance(ConnectionResetError(), PUBLISH_ERRORS)
