"""Message parsing and validation: bytes from the broker in, a ``ChatMessage`` or ``InvalidMessage`` out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from worker.errors import InvalidMessage

MAX_ID_CHARS = 256


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """A valid incoming message: its ID, its text, and every field of the body (passed through)."""

    message_id: str
    text: str
    body: dict[str, Any]


def parse_message(body: bytes, amqp_message_id: str | None, max_bytes: int) -> ChatMessage:
    """Validate one delivery's body; raise ``InvalidMessage`` with a reason code when it is unusable."""
    if len(body) > max_bytes:
        raise InvalidMessage("too_large", f"body is {len(body)} bytes, the limit is {max_bytes}")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidMessage("not_json", f"body is not valid UTF-8 JSON ({exc.msg})") from None
    if not isinstance(data, dict):
        raise InvalidMessage("not_object", f"body is a JSON {type(data).__name__}, not an object")

    message_id = data.get("message_id")
    if message_id is None:
        message_id = amqp_message_id or None
        if message_id is None:
            raise InvalidMessage(
                "no_message_id", "neither the body nor the AMQP properties carry a message_id"
            )
        data["message_id"] = message_id
    if not isinstance(message_id, str):
        raise InvalidMessage("bad_message_id", f"message_id is a {type(message_id).__name__}")
    if not message_id.strip():
        raise InvalidMessage("bad_message_id", "message_id is empty")
    if len(message_id) > MAX_ID_CHARS or not message_id.isprintable():
        raise InvalidMessage(
            "bad_message_id", f"message_id must be at most {MAX_ID_CHARS} printable characters"
        )

    text = data.get("text")
    if text is None:
        raise InvalidMessage("no_text", "body has no text field")
    if not isinstance(text, str):
        raise InvalidMessage("bad_text", f"text is a {type(text).__name__}, not a string")
    if not text.strip():
        raise InvalidMessage("empty_text", "text is empty or only whitespace")
    return ChatMessage(message_id=message_id, text=text, body=data)
