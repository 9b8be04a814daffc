"""Message parsing and validation: bytes from the broker in, a ``ChatMessage`` or ``InvalidMessage`` out.

Whatever the body, ``parse_message`` either returns a message the worker can process and publish,
or raises ``InvalidMessage`` with one of ``REASONS``; it never raises anything else. The checks
that cost more than a scan of the bytes (nesting depth, repeated keys) run only when a cheap scan
says they might fail.
"""

from __future__ import annotations

import json
import re
from typing import Any, NamedTuple

import orjson

from worker.core.errors import InvalidMessage

MAX_ID_CHARS = 256
# Nesting allowed in a body. Far below orjson's own limits (1024 to read, 254 to write), so a
# body that was read can always be written back out in its result.
MAX_JSON_DEPTH = 64

REASONS = frozenset(
    {
        "too_large",
        "not_json",
        "too_deep",
        "not_object",
        "duplicate_keys",
        "no_message_id",
        "bad_message_id",
        "no_text",
        "bad_text",
        "empty_text",
    }
)

# A key spelled with \u escapes of ASCII letters or '_' could hide a second message_id or text.
_ESCAPED_ASCII = re.compile(rb"\\u00[4-7][0-9a-fA-F]")
_IDENTITY_KEYS = ("message_id", "text")


class ChatMessage(NamedTuple):
    """A valid incoming message: its ID, its text, and every field of the body (passed through)."""

    message_id: str
    text: str
    body: dict[str, Any]


def parse_message(body: bytes, amqp_message_id: str | None, max_bytes: int) -> ChatMessage:
    """Validate one delivery's body; raise ``InvalidMessage`` with a reason code when it is unusable."""
    data = _body_object(body, max_bytes)
    message_id = _message_id(data, amqp_message_id)
    return ChatMessage(message_id=message_id, text=_text(data), body=data)


def _body_object(body: bytes, max_bytes: int) -> dict[str, Any]:
    """The body decoded as one JSON object of bounded size and depth, its identity keys unique."""
    if len(body) > max_bytes:
        raise InvalidMessage("too_large", f"body is {len(body)} bytes, the limit is {max_bytes}")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise _undecodable(body, exc) from None
    if not isinstance(data, dict):
        raise InvalidMessage("not_object", f"body is a JSON {type(data).__name__}, not an object")
    if body.count(b"{") + body.count(b"[") > MAX_JSON_DEPTH and _deeper_than(data, MAX_JSON_DEPTH):
        raise InvalidMessage("too_deep", f"body nests more than {MAX_JSON_DEPTH} levels")
    repeated = _repeated_identity_key(body)
    if repeated:
        raise InvalidMessage("duplicate_keys", f"body has more than one {repeated!r} key")
    return data


def _message_id(data: dict[str, Any], amqp_message_id: str | None) -> str:
    """The body's ``message_id``, else the AMQP property's (then written into the body)."""
    message_id = data.get("message_id")
    if message_id is None:
        message_id = amqp_message_id or None
        if message_id is None:
            raise InvalidMessage(
                "no_message_id", "neither the body nor the AMQP properties carry a message_id"
            )
        data["message_id"] = message_id
    if not isinstance(message_id, str):
        raise InvalidMessage(
            "bad_message_id", f"message_id must be a string, got {type(message_id).__name__}"
        )
    if not message_id.strip():
        raise InvalidMessage("bad_message_id", "message_id is empty")
    if len(message_id) > MAX_ID_CHARS or not message_id.isprintable():
        raise InvalidMessage(
            "bad_message_id", f"message_id must be at most {MAX_ID_CHARS} printable characters"
        )
    return message_id


def _text(data: dict[str, Any]) -> str:
    """The body's non-blank ``text``."""
    text = data.get("text")
    if text is None:
        raise InvalidMessage("no_text", "body has no text field")
    if not isinstance(text, str):
        raise InvalidMessage("bad_text", f"text must be a string, got {type(text).__name__}")
    if not text.strip():
        raise InvalidMessage("empty_text", "text is empty or only whitespace")
    return text


def _undecodable(body: bytes, exc: orjson.JSONDecodeError) -> InvalidMessage:
    """Say why orjson refused the body, in the most useful terms."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as bad:
        return InvalidMessage(
            "not_json",
            f"body is not UTF-8, so not JSON (byte 0x{body[bad.start]:02x} at offset {bad.start})",
        )
    if "depth" in exc.msg or "recursion" in exc.msg.lower():
        return InvalidMessage("too_deep", f"body nests more than {MAX_JSON_DEPTH} levels")
    return InvalidMessage("not_json", f"body is not valid JSON ({exc.msg})")


def _deeper_than(value: dict[str, Any] | list[Any], limit: int) -> bool:
    """Whether containers nest more than ``limit`` levels (the body itself is level 1)."""
    stack: list[tuple[dict[str, Any] | list[Any], int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def _repeated_identity_key(body: bytes) -> str | None:
    """``message_id`` or ``text`` when the top-level object spells that key more than once.

    JSON parsers disagree on which copy of a repeated key wins, so such a body means different
    things to different readers. orjson keeps the last one silently; the standard library parser
    (slower) is asked only when the bytes suggest a repeat.
    """
    if (
        body.count(b'"message_id"') < 2
        and body.count(b'"text"') < 2
        and not _ESCAPED_ASCII.search(body)
    ):
        return None
    objects: list[list[tuple[str, Any]]] = []

    def keep_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        objects.append(pairs)
        return {}

    try:
        json.loads(body, object_pairs_hook=keep_pairs)
    except ValueError:
        return None  # orjson read it; whatever the standard parser objects to is not a repeat
    top_keys = [key for key, _ in objects[-1]] if objects else []
    for key in _IDENTITY_KEYS:
        if top_keys.count(key) > 1:
            return key
    return None
